"""Does pretraining on the built-in source classes pay on the target classes? A small search.

For each architecture and image size: pretrain centrally on the source classes for a number of
epochs (the engine's ``train_local``, one call per epoch, SGD with warm-up + cosine, label
smoothing), then fine-tune centrally on the target classes for a few epochs from that backbone
and from random weights, and fit a linear probe (head only) on the frozen backbone. Prints one
line per candidate and, last, a JSON line with every number (seconds are wall time on this
machine, with ``--threads`` torch threads).

    python scripts/transfer_probe.py --models mobilenet_v3_small shufflenet_v2_x0_5 --sizes 64
    python scripts/transfer_probe.py --models resnet18 --sizes 32 --pretrain-epochs 4

Used to pick the default run's model, image size and pretraining recipe (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from omegaconf import OmegaConf

from fedvision.data.cache import DecodedCache
from fedvision.engine import TrainConfig, evaluate, train_local, warmup_cosine
from fedvision.models import build_model
from fedvision.runner import prepare_data


def _caches(subset: str, size: int) -> tuple[DecodedCache, DecodedCache]:
    data = OmegaConf.create(
        {"root": None, "subset": subset, "size": size, "first_n": None, "wnids": None,
         "classes_file": None, "max_per_class": None, "workers": None}
    )  # fmt: skip
    prepared = prepare_data(data, progress=False)
    assert prepared.train is not None and prepared.val is not None
    return prepared.train, prepared.val


def fit(
    model: torch.nn.Module,
    train: DecodedCache,
    val: DecodedCache,
    epochs: int,
    lr: float,
    *,
    augment: str,
    seed: int,
    batch_size: int,
    label_smoothing: float = 0.0,
) -> tuple[list[float], float]:
    """Train ``epochs`` epochs (half an epoch of warm-up, cosine to 0); val accuracy per epoch."""
    n = len(train.labels)
    steps = -(-n // batch_size)
    idx = np.arange(n)
    accs, start, state = [], time.perf_counter(), None
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch_size,
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        augment=augment,
        label_smoothing=label_smoothing,
    )
    total = epochs * steps
    for epoch in range(epochs):
        res = train_local(
            model, train.images, train.labels, idx, replace(cfg, seed=seed * 1000 + epoch), "cpu",
            optimizer_state=state, keep_optimizer_state=True,
            lr_at=lambda s, e=epoch: warmup_cosine(e * steps + s, total, steps // 2, lr, 0.0),
        )  # fmt: skip
        state = res.optimizer_state
        accs.append(evaluate(model, val.images, val.labels, device="cpu").accuracy)
        print(
            f"  epoch {epoch + 1}/{epochs}: val {accs[-1]:.3f} "
            f"({time.perf_counter() - start:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    return accs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        src_train, src_val = _caches("source", size)
        tgt_train, tgt_val = _caches("target", size)
        n_src, n_tgt = int(src_train.labels.max()) + 1, int(tgt_train.labels.max()) + 1
        for name in args.models:
            kw = {"augment": args.augment, "seed": args.seed, "batch_size": args.batch_size}
            torch.manual_seed(args.seed)
            model = build_model(name, n_src)
            pre, pre_s = fit(
                model, src_train, src_val, args.pretrain_epochs, args.lr,
                label_smoothing=0.1, **kw,
            )  # fmt: skip
            backbone = {k: v.clone() for k, v in model.state_dict().items()}
            results = {"model": name, "size": size, "pretrain_val": pre, "pretrain_s": pre_s}
            for start in ("pretrained", "scratch", "probe"):
                torch.manual_seed(args.seed + 1)
                tuned = build_model(name, n_tgt, finetune="head" if start == "probe" else "full")
                if start != "scratch":
                    own = tuned.state_dict()
                    own.update({k: v for k, v in backbone.items() if own[k].shape == v.shape})
                    tuned.load_state_dict(own)
                lr = args.lr * (1.0 if start == "probe" else 0.3)
                accs, secs = fit(tuned, tgt_train, tgt_val, args.finetune_epochs, lr, **kw)
                results[f"{start}_val"], results[f"{start}_s"] = accs, secs
            rows.append(results)
            print(
                f"{name:20s} {size:3d}px pretrain {pre[-1]:.3f} ({pre_s:.0f}s) | target "
                f"pretrained {results['pretrained_val'][-1]:.3f} scratch "
                f"{results['scratch_val'][-1]:.3f} probe {results['probe_val'][-1]:.3f}",
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
