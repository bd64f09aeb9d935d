"""Does pretraining on the built-in source classes pay on the target classes? A small search.

For each architecture, image size and seed: pretrain centrally on the source classes for a number
of epochs (the engine's ``train_local``, one call per epoch, SGD with warm-up + cosine, label
smoothing; the source val split is printed as *source validation* after each epoch and the
backbone of the last epoch is kept). Then, on the target classes, fine-tune for a few epochs from
that backbone and from random weights, and fit a linear probe (head only) on the frozen backbone.

The target side selects on validation data only: a stratified, seeded share of the target
*training* images (``--val-fraction`` per class, drawn with ``holdout_split``, the helper behind
``fedvision run``'s ``server_val_fraction``) is held out; fine-tuning trains on the rest, the
held-out part is evaluated after every epoch and picks the best epoch, and the target test split
(the dataset's val split, which ``fedvision run`` reports as its test split) is evaluated once,
with the weights of that epoch. Prints one line per candidate and seed, a summary table (mean ±
sample std over ``--seeds``, per-seed values in brackets) and, last, a JSON line with every number
(seconds are wall time on this machine, with ``--threads`` torch threads).

    python scripts/transfer_probe.py --models mobilenet_v3_small shufflenet_v2_x0_5 --sizes 64
    python scripts/transfer_probe.py --models shufflenet_v2_x0_5 --sizes 64 48 --seeds 0 1 2 \\
        --pretrain-epochs 8 --finetune-epochs 3 --threads 1

Used to pick the default run's model, image size and pretraining recipe
(docs/results/bench-models.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from fedvision.data.cache import DecodedCache
from fedvision.data.partition import holdout_split
from fedvision.engine import TrainConfig, evaluate, train_local, warmup_cosine
from fedvision.errors import FedvisionError
from fedvision.models import build_model
from fedvision.prepare import prepare_data

STARTS = ("pretrained", "scratch", "probe")  # target fine-tuning: from backbone, random, head only
METRICS = ("source_val", *(f"{s}_{m}" for s in STARTS for m in ("val", "test")))


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`select_on_val`.

    Attributes
    ----------
    val : list of float
        Validation accuracy after each epoch.
    best_epoch : int
        0-based epoch of the best validation accuracy (the earliest on ties).
    test : float
        Test accuracy of the weights of ``best_epoch``, the only test evaluation.
    seconds : float
        Wall time of training and evaluation.
    """

    val: list[float]
    best_epoch: int
    test: float
    seconds: float

    @property
    def val_best(self) -> float:
        """Validation accuracy at ``best_epoch``."""
        return self.val[self.best_epoch]


def _caches(subset: str, size: int) -> tuple[DecodedCache, DecodedCache]:
    """Train and val split of the built-in dataset's ``subset`` at ``size`` px."""
    data = OmegaConf.create(
        {"root": None, "subset": subset, "size": size, "first_n": None, "wnids": None,
         "classes_file": None, "max_per_class": None, "workers": None}
    )  # fmt: skip
    prepared = prepare_data(data, progress=False)
    assert prepared.train is not None and prepared.val is not None
    return prepared.train, prepared.val


def split_target(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training images into fit and held-out validation indices, stratified by class.

    Parameters
    ----------
    labels : np.ndarray
        1-D int class labels of the training images.
    fraction : float
        Share of each class held out (rounded to nearest), in ``(0, 1)``.
    seed : int
        Seed of the draw; the same seed gives the same split.

    Returns
    -------
    fit, val : np.ndarray
        Sorted, disjoint int64 indices that together cover every image once.

    Raises
    ------
    FedvisionError
        If ``fraction`` is outside ``(0, 1)`` or leaves some class without a validation image.
    """
    if not 0.0 < fraction < 1.0:
        raise FedvisionError(f"val_fraction={fraction} must lie in (0, 1)")
    val, fit = holdout_split(labels, fraction, seed)
    missing = np.setdiff1d(np.unique(labels), labels[val])
    if missing.size:
        raise FedvisionError(
            f"val_fraction={fraction} holds out no image of classes {missing.tolist()}"
        )
    return fit, val


def best_epoch(val: Sequence[float]) -> int:
    """0-based index of the highest validation accuracy, the earliest on ties."""
    if not len(val):
        raise ValueError("no epochs to choose from")
    return int(np.argmax(np.asarray(val, dtype=np.float64)))


def train_epochs(
    model: torch.nn.Module,
    cache: DecodedCache,
    indices: np.ndarray,
    epochs: int,
    lr: float,
    *,
    augment: str,
    seed: int,
    batch_size: int,
    label_smoothing: float = 0.0,
) -> Iterator[int]:
    """Train ``model`` on ``cache[indices]``, one epoch per step; yields the 0-based epoch.

    Half an epoch of linear warm-up, then cosine to 0 over all ``epochs``; SGD (momentum 0.9,
    weight decay 5e-4) whose state carries across epochs.
    """
    steps = -(-len(indices) // batch_size)
    total, state = epochs * steps, None
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch_size,
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        augment=augment,
        label_smoothing=label_smoothing,
    )
    for epoch in range(epochs):
        res = train_local(
            model, cache.images, cache.labels, indices, replace(cfg, seed=seed * 1000 + epoch),
            "cpu", optimizer_state=state, keep_optimizer_state=True,
            lr_at=lambda s, e=epoch: warmup_cosine(e * steps + s, total, steps // 2, lr, 0.0),
        )  # fmt: skip
        state = res.optimizer_state
        yield epoch


def accuracy_on(cache: DecodedCache, indices: np.ndarray | None = None) -> Callable[..., float]:
    """A function of a model: its accuracy on ``cache`` (on ``indices`` only, if given)."""
    return lambda model: evaluate(model, cache.images, cache.labels, indices, device="cpu").accuracy


def select_on_val(
    model: torch.nn.Module,
    epochs: Iterable[int],
    val_acc: Callable[[torch.nn.Module], float],
    test_acc: Callable[[torch.nn.Module], float],
    *,
    label: str = "target",
) -> Selection:
    """Train, pick the epoch on validation, and evaluate the test split once, for that epoch.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained; left holding the weights of the chosen epoch.
    epochs : iterable of int
        Trains ``model`` one epoch per item (e.g. :func:`train_epochs`).
    val_acc, test_acc : callable
        Accuracy of a model on the validation part and on the test split.
    label : str
        Name printed on each epoch's progress line.

    Returns
    -------
    Selection
    """
    start, val, best_state = time.perf_counter(), [], None
    for epoch in epochs:
        val.append(float(val_acc(model)))
        if best_epoch(val) == len(val) - 1:  # new best: keep its weights (and BN statistics)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(
            f"  epoch {epoch + 1}: {label} val {val[-1]:.3f} ({time.perf_counter() - start:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    if best_state is None:
        raise ValueError("no epochs were trained")
    model.load_state_dict(best_state)
    test = float(test_acc(model))
    return Selection(val, best_epoch(val), test, time.perf_counter() - start)


def run_candidate(
    name: str,
    source: tuple[DecodedCache, DecodedCache],
    target: tuple[DecodedCache, DecodedCache],
    *,
    seed: int,
    val_fraction: float,
    pretrain_epochs: int,
    finetune_epochs: int,
    lr: float,
    batch_size: int,
    augment: str,
) -> dict[str, Any]:
    """Pretrain ``name`` on the source classes, then fine-tune three ways on the target classes.

    Parameters
    ----------
    name : str
        torchvision architecture.
    source, target : tuple of DecodedCache
        ``(train, val)`` splits; the target val split is the test split (evaluated once per start).
    seed : int
        Seeds the weights, the batches and the target validation hold-out.
    val_fraction : float
        Share of each target class's training images held out for validation.
    pretrain_epochs, finetune_epochs, lr, batch_size, augment
        The recipe; fine-tuning uses ``0.3 * lr`` (the linear probe ``lr``).

    Returns
    -------
    dict
        ``source_val`` (last pretraining epoch), ``source_val_per_epoch``, ``pretrain_s`` and, per
        start, ``<start>_val`` (best epoch), ``<start>_test`` (at that epoch),
        ``<start>_best_epoch`` (1-based), ``<start>_val_per_epoch`` and ``<start>_s``.
    """
    (src_train, src_val), (tgt_train, tgt_test) = source, target
    n_src, n_tgt = int(src_train.labels.max()) + 1, int(tgt_train.labels.max()) + 1
    kw = {"augment": augment, "seed": seed, "batch_size": batch_size}
    torch.manual_seed(seed)
    model = build_model(name, n_src)
    t0, pre = time.perf_counter(), []
    src_idx = np.arange(len(src_train), dtype=np.int64)
    for epoch in train_epochs(
        model, src_train, src_idx, pretrain_epochs, lr, label_smoothing=0.1, **kw
    ):
        pre.append(accuracy_on(src_val)(model))
        print(
            f"  pretrain epoch {epoch + 1}/{pretrain_epochs}: source val {pre[-1]:.3f} "
            f"({time.perf_counter() - t0:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    out: dict[str, Any] = {
        "source_val": pre[-1],
        "source_val_per_epoch": pre,
        "pretrain_s": time.perf_counter() - t0,
    }
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    fit_idx, val_idx = split_target(tgt_train.labels, val_fraction, seed)
    out["target_fit_images"], out["target_val_images"] = int(fit_idx.size), int(val_idx.size)
    for start in STARTS:
        torch.manual_seed(seed + 1)
        tuned = build_model(name, n_tgt, finetune="head" if start == "probe" else "full")
        if start != "scratch":
            own = tuned.state_dict()
            own.update({k: v for k, v in backbone.items() if own[k].shape == v.shape})
            tuned.load_state_dict(own)
        ft_lr = lr * (1.0 if start == "probe" else 0.3)
        sel = select_on_val(
            tuned,
            train_epochs(tuned, tgt_train, fit_idx, finetune_epochs, ft_lr, **kw),
            accuracy_on(tgt_train, val_idx),
            accuracy_on(tgt_test),
            label=f"{start}: target",
        )
        out[f"{start}_val"], out[f"{start}_test"] = sel.val_best, sel.test
        out[f"{start}_best_epoch"], out[f"{start}_val_per_epoch"] = sel.best_epoch + 1, sel.val
        out[f"{start}_s"] = sel.seconds
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample std (ddof=1; 0 for one seed) and per-seed values per model and size.

    Parameters
    ----------
    rows : sequence of dict
        One per model, size and seed, with ``model``, ``size``, ``seed`` and the :data:`METRICS`.

    Returns
    -------
    list of dict
        One per (model, size) in first-seen order: ``model``, ``size``, ``seeds``, ``pretrain_s``
        (mean) and, per metric, ``{"mean", "std", "values"}`` (values in seed order).
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["size"]), []).append(row)
    out = []
    for (model, size), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {
            "model": model,
            "size": size,
            "seeds": [r["seed"] for r in runs],
            "pretrain_s": float(np.mean([r["pretrain_s"] for r in runs])),
        }
        for key in METRICS:
            v = np.array([r[key] for r in runs], dtype=np.float64)
            std = float(v.std(ddof=1)) if v.size > 1 else 0.0
            entry[key] = {"mean": float(v.mean()), "std": std, "values": v.tolist()}
        out.append(entry)
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize`'s output: mean ± std [per-seed values]."""

    def cell(m: dict[str, Any]) -> str:
        seeds = ", ".join(f"{x:.3f}" for x in m["values"])
        return f"{m['mean']:.3f} ± {m['std']:.3f} [{seeds}]"

    head = ["model, size", "seeds", "source val (pretrain)"] + [
        f"{s} {m}" for s in STARTS for m in ("val (best epoch)", "test (that epoch)")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in summary:
        cells = [f"{e['model']}, {e['size']} px", " ".join(map(str, e["seeds"]))]
        cells += [cell(e[key]) for key in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, run every model x size x seed, print the lines, table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction} must lie in (0, 1)")
    if args.pretrain_epochs < 1 or args.finetune_epochs < 1:
        parser.error("--pretrain-epochs and --finetune-epochs must be at least 1")
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        source, target = _caches("source", size), _caches("target", size)
        for name in args.models:
            for seed in args.seeds:
                t0 = time.perf_counter()
                res = run_candidate(
                    name, source, target, seed=seed, val_fraction=args.val_fraction,
                    pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.finetune_epochs,
                    lr=args.lr, batch_size=args.batch_size, augment=args.augment,
                )  # fmt: skip
                row = {"model": name, "size": size, "seed": seed, **res}
                row["total_s"] = time.perf_counter() - t0
                rows.append(row)
                print(
                    f"{name:20s} {size:3d}px seed {seed}: source val {row['source_val']:.3f} "
                    f"({row['pretrain_s']:.0f}s) | target val/test "
                    + " ".join(f"{s} {row[s + '_val']:.3f}/{row[s + '_test']:.3f}" for s in STARTS)
                    + f" ({row['total_s']:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    summary = summarize(rows)
    print(format_summary(summary), file=sys.stderr, flush=True)
    print(json.dumps({"args": vars(args), "runs": rows, "summary": summary}))


if __name__ == "__main__":
    main()
