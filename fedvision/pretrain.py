"""``fedvision pretrain``: centralised training of a torchvision CNN, the recipe's first step.

Trains on the built-in dataset's source classes (or any ImageFolder / ImageNet tree, through the
same ``data`` group and decoded cache as ``fedvision run``) with the engine's ``train_local``,
one call per epoch carrying its slice of a warm-up + cosine schedule and the optimiser state, so
there is no second training loop. The run directory holds ``config.yaml``, ``metrics.jsonl``
(one line per epoch), ``curves.png``, ``checkpoint_latest.pt`` (for ``resume=``),
``checkpoint_best.pt`` (best validation accuracy; what ``fedvision run model.weights=`` takes),
``summary.json`` and ``status.json``.

:func:`ensure_pretrained` makes the default run's starting model: this recipe at its defaults,
cached under ``$FEDVISION_HOME/pretrained`` by a key of everything that determines it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedvision import constants as C
from fedvision.atomic import read_jsonl, save_torch_atomic, write_json_atomic, write_text_atomic
from fedvision.config import CONF_DIR, compose_config, model_normalise
from fedvision.data.cache import DecodedCache
from fedvision.data.partition import holdout_split
from fedvision.engine import (
    TrainConfig,
    evaluate,
    resolve_device,
    steps_per_epoch,
    train_local,
    warmup_cosine_epoch,
)
from fedvision.errors import FedvisionError
from fedvision.models import build_model, list_architectures
from fedvision.paths import fedvision_home
from fedvision.prepare import check_weights, prepare_data, resolve_weights
from fedvision.report.plots import plot_curves
from fedvision.rundir import DirGuard, read_status, write_status

# Bump when the training procedure changes what a recipe produces (invalidates cached models).
PRETRAIN_VERSION = 1
# Settings that change how a pretraining run is shown or where it runs, not the model it makes.
_NOT_IN_KEY = ("progress", "device", "resume", "overwrite", "eval_batch_size")


# The recipe's keys named like TrainConfig's fields; its epochs, warmup_epochs and lr_min_factor
# shape the schedule instead (each train_local call is one epoch).
_RECIPE_FIELDS = (
    "batch_size", "lr", "optimizer", "momentum", "weight_decay", "augment", "label_smoothing",
)  # fmt: skip


def recipe_train_config(cfg: DictConfig, epoch: int = 0) -> TrainConfig:
    """The engine's config for one epoch of the recipe (validates the recipe's values)."""
    recipe = {k: cfg.recipe[k] for k in _RECIPE_FIELDS}
    return TrainConfig.from_mapping(
        recipe, epochs=1, normalise=model_normalise(cfg), seed=int(cfg.seed) * 100_003 + epoch
    )


def check_pretrain_config(cfg: DictConfig) -> None:
    """Refuse impossible recipe values before any data work."""
    r = cfg.recipe
    if str(r.optimizer) not in ("sgd", "adamw"):
        raise FedvisionError(f"recipe.optimizer={r.optimizer!r}: use sgd or adamw")
    recipe_train_config(cfg)
    if int(r.epochs) < 1:
        raise FedvisionError(f"recipe.epochs={r.epochs} must be >= 1")
    if not 0 <= float(r.warmup_epochs) < int(r.epochs):
        raise FedvisionError(
            f"recipe.warmup_epochs={r.warmup_epochs} must lie in [0, recipe.epochs={r.epochs})"
        )
    if not 0 <= float(r.lr_min_factor) <= 1:
        raise FedvisionError(f"recipe.lr_min_factor={r.lr_min_factor} must lie in [0, 1]")
    if not 0 < float(cfg.val_fraction) < 1:
        raise FedvisionError(f"val_fraction={cfg.val_fraction} must lie in (0, 1)")
    if int(cfg.eval_batch_size) < 1:
        raise FedvisionError(f"eval_batch_size={cfg.eval_batch_size} must be >= 1")
    if int(cfg.data.size) < 8:
        raise FedvisionError(f"data.size={cfg.data.size} must be >= 8 pixels")
    if str(cfg.model.name) not in list_architectures():
        build_model(str(cfg.model.name), 2)  # raises the error with close names

    # pretrained: the cached source-class model, e.g. for central fine-tuning references and
    # linear probes on the target classes (the transfer experiment).
    check_weights(cfg.model, cfg.data)


def _splits(cfg: DictConfig) -> tuple[DecodedCache, np.ndarray, np.ndarray, DecodedCache | None]:
    """Training cache with its train and validation indices, and the test split if any.

    Validation is a stratified share of the training images (it picks the best epoch); the
    dataset's own val split is the test split, reported every epoch and never used to select,
    as in ``fedvision run`` (so central references and federated runs are comparable).
    """

    prepared = prepare_data(cfg.data, progress=bool(cfg.progress))
    train = prepared.train
    held, rest = holdout_split(train.labels, float(cfg.val_fraction), int(cfg.seed))
    test = prepared.val if prepared.val is not None and len(prepared.val) else None
    return train, rest, held, test


def _lr_at(cfg: DictConfig, epoch: int, steps: int) -> Callable[[int], float]:
    """Epoch ``epoch``'s slice of the recipe's warm-up + cosine schedule, by step within it."""
    r = cfg.recipe
    lr = float(r.lr)
    return warmup_cosine_epoch(
        epoch, steps, int(r.epochs), float(r.warmup_epochs), lr, lr * float(r.lr_min_factor)
    )


def _best_payload(cfg: DictConfig, model: torch.nn.Module, classes: list[str], **meta: Any) -> dict:
    # {"model": state_dict} is what fedvision.models.build_model(weights=path) reads.
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": str(cfg.model.name),
        "num_classes": len(classes),
        "classes": classes,
        "image_size": int(cfg.data.size),
        "kind": "fedvision-pretrain",
        **meta,
    }


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    # A service manager's SIGTERM stops pretraining as Ctrl-C does (else: no status at all).
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PretrainDirGuard(DirGuard):
    """Hydra callback of ``fedvision pretrain``: one run per directory, config checked first."""

    def check(self, config: DictConfig) -> None:
        """Refuse impossible recipe values before Hydra creates the run directory."""
        check_pretrain_config(config)


def run_pretrain(cfg: DictConfig, run_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Pretrain into ``run_dir`` (or continue it); return the summary.

    Parameters
    ----------
    cfg
        A composed ``conf/pretrain.yaml``.
    run_dir
        The run directory; with ``resume`` it must hold ``checkpoint_latest.pt``.
    resume
        Continue from the latest checkpoint: weights, optimiser state, epoch, best so far.
    """
    start = time.time()
    check_pretrain_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / C.RUN_STATUS).unlink(missing_ok=True)
    try:
        with _sigterm_interrupts():
            summary = _pretrain(cfg, run_dir, resume, start)
    except FedvisionError as exc:
        write_status(run_dir, "failed", str(exc), user_error=True)
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: checkpoint_latest.pt is the last whole epoch
        done = len(read_jsonl(run_dir / C.RUN_METRICS)) if (run_dir / C.RUN_METRICS).exists() else 0
        write_status(run_dir, "interrupted", f"stopped by a signal after epoch {done}", epoch=done)
        raise
    except BaseException as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}", type=type(exc).__name__)
        raise
    write_status(run_dir, "finished")
    return summary


def _pretrain(cfg: DictConfig, run_dir: Path, resume: bool, start: float) -> dict[str, Any]:
    if not resume:
        write_text_atomic(run_dir / C.RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    train, train_idx, val_idx, test = _splits(cfg)
    classes = list(train.class_names)
    device = resolve_device(str(cfg.device))

    # pretrained: the built-in backbone (data.root: the best start)
    weights = resolve_weights(cfg, ensure_pretrained)
    torch.manual_seed(int(cfg.seed))
    model = build_model(
        str(cfg.model.name),
        len(classes),
        weights=weights,
        finetune=str(cfg.model.finetune),
        last_k=int(cfg.model.last_k),
        allow_head_mismatch=bool(cfg.model.get("allow_head_mismatch", True)),
    )
    epochs = int(cfg.recipe.epochs)
    steps = steps_per_epoch(len(train_idx), int(cfg.recipe.batch_size))
    first, opt_state, best = 0, None, {"epoch": None, "val_accuracy": -1.0}
    records: list[dict[str, Any]] = []
    if resume:
        ckpt = _load_latest(run_dir, str(cfg.model.name))
        model.load_state_dict(ckpt["model"])
        first, opt_state, best = ckpt["epoch"] + 1, ckpt["optimizer"], ckpt["best"]
        torch.set_rng_state(ckpt["torch_rng"])
        records = [r for r in read_jsonl(run_dir / C.RUN_METRICS) if r["epoch"] <= ckpt["epoch"]]
        _write_jsonl(run_dir / C.RUN_METRICS, records)
    elapsed0 = records[-1]["elapsed_s"] if records else 0.0
    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        res = train_local(
            model,
            train.images,
            train.labels,
            train_idx,
            recipe_train_config(cfg, epoch),
            device,
            optimizer_state=opt_state,
            keep_optimizer_state=True,
            lr_at=_lr_at(cfg, epoch, steps),
        )
        opt_state = res.optimizer_state
        bs = int(cfg.eval_batch_size)
        norm = model_normalise(cfg)
        ev = evaluate(
            model, train.images, train.labels, val_idx, batch_size=bs, device=device,
            normalise=norm,
        )  # fmt: skip
        te = (
            None
            if test is None
            else evaluate(
                model, test.images, test.labels, batch_size=bs, device=device, normalise=norm
            )
        )
        elapsed0 += time.perf_counter() - t0
        rec = {
            "epoch": epoch,
            "round": epoch + 1,  # what `fedvision report` plots: epochs of a central run
            "train_loss": res.loss,
            "train_accuracy": res.accuracy,
            "val_loss": ev.loss,
            "val_accuracy": ev.accuracy,
            "test_loss": None if te is None else te.loss,
            "test_accuracy": None if te is None else te.accuracy,
            "lr_end": _lr_at(cfg, epoch, steps)(steps - 1),
            "epoch_s": round(time.perf_counter() - t0, 3),
            "elapsed_s": round(elapsed0, 3),
        }
        records.append(rec)
        improved = ev.accuracy > best["val_accuracy"]
        if improved:
            best = {
                "epoch": epoch,
                "val_accuracy": ev.accuracy,
                "test_accuracy": None if te is None else te.accuracy,
            }
            save_torch_atomic(
                run_dir / C.CKPT_BEST,
                _best_payload(cfg, model, classes, epoch=epoch, val_accuracy=ev.accuracy),
            )
        save_torch_atomic(
            run_dir / C.CKPT_LATEST,
            {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt_state,
                "epoch": epoch,
                "best": best,
                "torch_rng": torch.get_rng_state(),
                "arch": str(cfg.model.name),
                "kind": "fedvision-pretrain-latest",
            },
        )
        # The metrics line goes in after the checkpoint it describes is in place.
        with (run_dir / C.RUN_METRICS).open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if cfg.progress:
            print(
                f"pretrain {epoch + 1}/{epochs}: train loss {res.loss:.3f}, val accuracy "
                f"{ev.accuracy:.3f} (best {best['val_accuracy']:.3f}), {rec['epoch_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    plot_curves(
        records,
        run_dir / C.RUN_CURVES,
        title=f"pretrain {cfg.model.name} ({len(classes)} classes)",
        x_label="epoch",
    )
    summary = {
        "arch": str(cfg.model.name),
        "num_classes": len(classes),
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "val_accuracy_best": best["val_accuracy"],
        "val_accuracy_final": records[-1]["val_accuracy"],
        "test_accuracy_final": records[-1]["test_accuracy"],
        "test_accuracy_at_best_val": best.get("test_accuracy"),
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "test_images": 0 if test is None else len(test),
        "train_s": records[-1]["elapsed_s"],
        "wall_s": round(time.time() - start, 2),
        "checkpoint": C.CKPT_BEST,  # relative: the directory may move (the pretrained cache)
    }
    write_json_atomic(run_dir / C.RUN_SUMMARY, summary)
    return summary


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def _load_latest(run_dir: Path, arch: str) -> dict[str, Any]:
    path = run_dir / C.CKPT_LATEST
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise FedvisionError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "fedvision-pretrain-latest":
        raise FedvisionError(f"{path} is not a fedvision pretrain checkpoint")
    if ckpt["arch"] != arch:
        raise FedvisionError(f"{path} holds a {ckpt['arch']}, this config a {arch}")
    return ckpt


def check_pretrain_resume(path: str) -> Path:
    """The directory ``resume=`` names, if it holds a pretraining run that can continue."""
    run_dir = Path(path).expanduser()
    missing = [n for n in (C.RUN_CONFIG, C.CKPT_LATEST) if not (run_dir / n).is_file()]
    if missing:
        raise FedvisionError(
            f"resume={path}: no {', '.join(missing)} there; point resume at the directory of a "
            "pretraining run that finished at least one epoch"
        )
    return run_dir


# --- the default run's pretrained model -----------------------------------------------------------


def pretrained_key(cfg: DictConfig, dataset_fingerprint: str) -> str:
    """Hash of what determines a pretrained model: recipe, model, data options, dataset files."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_IN_KEY:
        plain.pop(key, None)
    plain["data"].pop("workers", None)
    if plain["model"].get("normalise", "imagenet") == "imagenet":
        # The only normalisation before model.normalise existed: cached models keep their key.
        plain["model"].pop("normalise", None)
    blob = {"version": PRETRAIN_VERSION, "config": plain, "dataset": dataset_fingerprint}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def default_pretrain_config(arch: str, size: int, *, progress: bool = True) -> DictConfig:
    """``conf/pretrain.yaml`` at its defaults for ``arch`` at ``size`` px (the fixed recipe)."""
    return compose_config(
        [f"model.name={arch}", f"data.size={size}", f"progress={str(progress).lower()}"],
        config_name="pretrain",
    )


def ensure_pretrained(arch: str, size: int, *, progress: bool = True) -> Path:
    """The cached pretrained model for ``arch`` at ``size`` px; made (once) if missing.

    Returns the path of its ``checkpoint_best.pt`` under
    ``$FEDVISION_HOME/pretrained/<arch>-<size>px-<key>/``. The key covers the recipe, the model
    and data options and the source dataset's fingerprint, so a change to any of them makes a
    new model instead of reusing a stale one.
    """

    cfg = default_pretrain_config(arch, size, progress=progress)
    check_pretrain_config(cfg)
    # Decoding is needed anyway to pretrain, and gives the dataset's fingerprint for the key.
    prepared = prepare_data(cfg.data, progress=progress)
    fp = "|".join(str(c.meta.get("fingerprint")) for c in prepared.splits().values())
    out = fedvision_home() / "pretrained" / f"{arch}-{size}px-{pretrained_key(cfg, fp)}"
    if (out / C.CKPT_BEST).is_file() and (out / C.RUN_SUMMARY).is_file():
        return out / C.CKPT_BEST
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"fedvision: pretraining {arch} at {size} px on the built-in source classes (first run "
        f"only; cached in {out})",
        file=sys.stderr,
        flush=True,
    )
    summary = run_pretrain(cfg, tmp)
    if out.exists():  # another process made it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    print(
        f"fedvision: pretrained {arch}: source-class validation accuracy "
        f"{summary['val_accuracy_best']:.3f} after {summary['epochs']} epochs "
        f"({summary['train_s']:.0f} s)",
        file=sys.stderr,
    )
    return out / C.CKPT_BEST


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def hydra_pretrain(cfg: DictConfig) -> float | None:
    """Hydra task of ``fedvision pretrain`` (one run or one job of a ``-m`` sweep)."""
    try:
        if cfg.resume is not None:
            run_dir = check_pretrain_resume(str(cfg.resume))
            saved = OmegaConf.load(run_dir / C.RUN_CONFIG)
            saved.progress, saved.device = cfg.progress, cfg.device
            summary = run_pretrain(saved, run_dir, resume=True)
        else:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            summary = run_pretrain(cfg, run_dir)
    except FedvisionError as exc:
        print(f"fedvision: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        status = read_status(run_dir) or {}
        said = status.get("error", "interrupted")
        print(f"\nfedvision: {said}; continue with resume={run_dir}", file=sys.stderr)
        raise SystemExit(130) from None
    status = read_status(run_dir)
    print(json.dumps({**summary, "status": status["status"] if status else None}))
    return summary["val_accuracy_best"]
