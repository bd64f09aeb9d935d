"""``fedvision compress``: prune and quantize a run's global model, then measure every variant.

Every variant starts from the same saved global model and is measured in the same process against
it: bytes on disk, parameters and non-zeros, test accuracy (``fedvision.engine.evaluate`` on the
run's test split, on the CPU) and CPU latency per image at batch 1 and batch N.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedvision import constants as C
from fedvision.atomic import save_torch_atomic, write_json_atomic, write_text_atomic
from fedvision.compress.measure import count_parameters, latency_ms_per_image, zlib_size
from fedvision.compress.prune import (
    check_sparsity,
    make_permanent,
    prune_channels,
    prune_global_unstructured,
)
from fedvision.compress.quantize import BACKEND, quantize_int8
from fedvision.config import model_normalise
from fedvision.data.cache import DecodedCache
from fedvision.data.transforms import build_eval_transform
from fedvision.engine import TrainConfig, evaluate, train_local
from fedvision.errors import FedvisionError
from fedvision.models import build_model
from fedvision.rundir import load_run_config, read_plan

CHECKPOINTS = {"best": C.CKPT_BEST, "latest": C.CKPT_LATEST}


@dataclass(frozen=True)
class CompressSpec:
    """Which variants to make and how to measure them.

    Attributes
    ----------
    prune : global unstructured magnitude sparsities, one variant each.
    structured : shares of output channels zeroed per conv layer, one variant each.
    norm : the Ln norm ranking channels for ``structured`` (1 or 2).
    quantize : add an int8 variant (post-training static quantization).
    finetune_epochs : centralised epochs on the run's training split after pruning (0: none).
    finetune_lr : learning rate of that fine-tune (the rest comes from the run's ``client``).
    device : where the fine-tune runs (evaluation and latency are always on the CPU).
    calib_images : training images that calibrate the int8 activation ranges.
    repeats : timed forward passes per model and batch size (the median is reported).
    batch : the larger latency batch (batch 1 is always measured).
    threads : ``torch.set_num_threads`` while timing.
    """

    prune: tuple[float, ...] = ()
    structured: tuple[float, ...] = ()
    norm: int = 1
    quantize: bool = False
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    device: str = "auto"
    calib_images: int = 256
    repeats: int = 10
    batch: int = 64
    threads: int = 1

    def __post_init__(self) -> None:
        for s in self.prune:
            check_sparsity(s, "--prune")
        for s in self.structured:
            check_sparsity(s, "--structured")
        if not (self.prune or self.structured or self.quantize):
            raise FedvisionError(
                "nothing to compress: pass --prune S, --structured S and/or --quantize"
            )
        problems = [
            f"{name} must be >= {low} (got {value})"
            for name, value, low in (
                ("--finetune-epochs", self.finetune_epochs, 0),
                ("--calib-images", self.calib_images, 1),
                ("--repeats", self.repeats, 1),
                ("--batch", self.batch, 1),
                ("--threads", self.threads, 1),
            )
            if value < low
        ]
        if self.norm not in (1, 2):
            problems.append(f"--norm must be 1 or 2 (got {self.norm})")
        if not self.finetune_lr > 0:
            problems.append(f"--finetune-lr must be > 0 (got {self.finetune_lr})")
        if problems:
            raise FedvisionError("; ".join(problems))


def resolve_source(
    source: Path, checkpoint: str = "best", run_dir: Path | None = None
) -> tuple[Path, Path]:
    """Return (run directory, weights file) for a run directory or a checkpoint file.

    Parameters
    ----------
    source
        A run directory (its ``checkpoint_best.pt`` or ``checkpoint_latest.pt`` is used) or a
        weights file: a run checkpoint or a state dict (``{"model": ...}`` too).
    checkpoint
        ``best`` or ``latest``, for a run directory.
    run_dir
        The run whose config and data go with a weights file (default: the file's folder).
    """
    source = Path(source).expanduser()
    if checkpoint not in CHECKPOINTS:
        raise FedvisionError(f"--checkpoint must be best or latest (got {checkpoint!r})")
    if source.is_dir():
        weights = source / CHECKPOINTS[checkpoint]
        if not weights.is_file():
            raise FedvisionError(
                f"{source} has no {weights.name}: the run has not evaluated a round yet, or it is "
                "not a run directory; try --checkpoint latest or pass a checkpoint file"
            )
        return source, weights
    if not source.is_file():
        raise FedvisionError(f"{source} does not exist; pass a run directory or a checkpoint file")
    run = Path(run_dir).expanduser() if run_dir is not None else source.parent
    if not (run / C.RUN_PLAN).is_file():
        raise FedvisionError(
            f"{run} is not a fedvision run directory (no {C.RUN_PLAN}), so the model and data of "
            f"{source.name} are unknown; pass --run DIR, the run it belongs to"
        )
    return run, source


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"compress: {msg}", file=sys.stderr, flush=True)


def _batches(
    images: np.ndarray, idx: np.ndarray, size: int, normalise: str
) -> Iterator[torch.Tensor]:
    """Normalised float batches of ``images[idx]``, as evaluation sees them."""
    transform = build_eval_transform(None, normalise)
    for i in range(0, len(idx), size):
        yield transform(torch.from_numpy(np.asarray(images[np.sort(idx[i : i + size])])))


@dataclass
class _Variant:
    name: str
    model: nn.Module
    file: Path
    finetune: dict[str, Any] | None = None


def compress_run(
    source: Path,
    out: Path | None,
    spec: CompressSpec,
    *,
    checkpoint: str = "best",
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Make the variants of ``spec`` from a run's global model, measure them, write the tables.

    Parameters
    ----------
    source, checkpoint, run_dir
        Where the model comes from (see :func:`resolve_source`).
    out
        Output folder (default ``<run>/compress``): the variants' weights, ``compress.md``,
        ``compress.csv`` and ``compress.json``.
    spec
        What to make and how to measure it.
    progress
        Progress lines and bars on stderr.

    Returns
    -------
    dict
        What ``compress.json`` holds: the settings and one row per variant, ``float`` first.
    """
    run, weights = resolve_source(source, checkpoint, run_dir)
    cfg = load_run_config(run)
    plan = read_plan(run)
    arch = str(cfg["model"]["name"])
    out = run / C.COMPRESS_DIR if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = DecodedCache.open(plan.train_cache), DecodedCache.open(plan.test_cache)
    held = np.load(plan.server_val_file) if plan.server_val_file else np.zeros(0, np.int64)
    # The server's validation images stay unseen by the fine-tune and the calibration.
    pool = np.setdiff1d(np.arange(len(train)), held)
    seed = int(cfg.get("seed", 0))
    norm = model_normalise(cfg)  # as the run's model was trained

    _say(f"{arch} from {weights}", progress)
    # Strict: a head of another size would otherwise be replaced silently by a random one.
    base = build_model(
        arch, plan.num_classes, weights=str(weights), allow_head_mismatch=False
    ).eval()
    meta = {"arch": arch, "num_classes": plan.num_classes, "source": str(weights)}
    variants = [
        _Variant(
            "float",
            base,
            save_torch_atomic(
                out / C.COMPRESS_FLOAT, {"model": base.state_dict(), "variant": "float", **meta}
            ),
        )
    ]

    def pruned(name: str, file: Path, apply: Any) -> _Variant:
        model = copy.deepcopy(base)
        apply(model)
        ft = None
        if spec.finetune_epochs:
            ft = _finetune(model, train, pool, cfg, spec, seed, progress)
            name += f", fine-tuned {spec.finetune_epochs} ep"
        make_permanent(model)
        payload = {"model": model.state_dict(), "variant": name, **meta}
        return _Variant(name, model.cpu().eval(), save_torch_atomic(file, payload), ft)

    for s in spec.prune:
        _say(f"global unstructured magnitude pruning to {s:g}", progress)
        variants.append(
            pruned(
                f"unstructured {s:g}",
                out / C.COMPRESS_PRUNED.format(s),
                lambda m, s=s: prune_global_unstructured(m, s),
            )
        )
    for s in spec.structured:
        _say(f"L{spec.norm} channel pruning, {s:g} of each conv layer's channels", progress)
        variants.append(
            pruned(
                f"channels {s:g} (L{spec.norm})",
                out / C.COMPRESS_CHANNELS.format(s),
                lambda m, s=s: prune_channels(m, s, spec.norm),
            )
        )
    if spec.quantize:
        rng = np.random.default_rng(seed)
        calib = rng.choice(pool, size=min(spec.calib_images, len(pool)), replace=False)
        _say(f"int8 ({BACKEND} FX PTQ), calibrating on {len(calib)} training images", progress)
        q = quantize_int8(copy.deepcopy(base), _batches(train.images, calib, 64, norm))
        payload = {"int8_model": q.state_dict(), "backend": BACKEND, "image_size": test.size}
        variants.append(
            _Variant(
                "int8",
                q,
                save_torch_atomic(out / C.COMPRESS_INT8, {**payload, "variant": "int8", **meta}),
            )
        )

    bs = int(cfg.get("eval_batch_size", 256))
    rows = [_measure(v, test, bs, norm, progress) for v in variants]
    batch = min(spec.batch, len(test))
    x = next(_batches(test.images, np.arange(batch), batch, norm))
    models = {v.name: v.model for v in variants}
    _say(
        f"latency: {spec.repeats} repeats, {spec.threads} thread(s), batch 1 and {batch}", progress
    )
    lat1 = latency_ms_per_image(
        models, x[:1], repeats=spec.repeats, threads=spec.threads, progress=progress
    )
    latn = latency_ms_per_image(
        models, x, repeats=spec.repeats, threads=spec.threads, progress=progress
    )
    ref = rows[0]
    for row, v in zip(rows, variants, strict=True):
        row["ms_per_image_b1"], row["ms_per_image_batch"] = lat1[v.name], latn[v.name]
        for key in ("size_bytes", "zlib_bytes", "ms_per_image_b1", "ms_per_image_batch"):
            row[f"{key}_vs_float"] = row[key] / ref[key]
        row["test_accuracy_delta"] = row["test_accuracy"] - ref["test_accuracy"]
    report = {
        "run_dir": str(run),
        "out": str(out),
        "source": str(weights),
        "arch": arch,
        "num_classes": plan.num_classes,
        "test_images": len(test),
        "image_size": test.size,
        "threads": spec.threads,
        "repeats": spec.repeats,
        "batch": batch,
        "torch": torch.__version__,
        "quantization": f"torch.ao FX graph mode PTQ, {BACKEND} qconfig (deprecated in torch)",
        "spec": dataclasses.asdict(spec),
        "variants": rows,
    }
    write_tables(report, out)
    return report


def _finetune(
    model: nn.Module,
    train: DecodedCache,
    pool: np.ndarray,
    cfg: dict[str, Any],
    spec: CompressSpec,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune a pruned model with the engine's loop; the pruning hooks keep the zeros."""
    # The run's client settings (optimizer, batch size, ...) at the fine-tune's epochs and rate.
    tcfg = TrainConfig.from_mapping(
        cfg.get("client", {}),
        epochs=spec.finetune_epochs,
        max_steps=None,
        lr=spec.finetune_lr,
        normalise=model_normalise(cfg),
        seed=seed,
    )
    _say(
        f"fine-tuning {spec.finetune_epochs} epoch(s) on {len(pool)} training images "
        f"({tcfg.optimizer}, lr {tcfg.lr:g}, batch {tcfg.batch_size})",
        progress,
    )
    res = train_local(model, train.images, train.labels, pool, tcfg, spec.device, progress=progress)
    model.cpu()
    return {"epochs": spec.finetune_epochs, "lr": tcfg.lr, "steps": res.steps,
            "train_accuracy": res.accuracy, "seconds": res.seconds}  # fmt: skip


def _measure(
    v: _Variant, test: DecodedCache, batch_size: int, normalise: str, progress: bool
) -> dict[str, Any]:
    _say(f"evaluating {v.name} on {len(test)} test images", progress)
    res = evaluate(
        v.model, test.images, test.labels, batch_size=batch_size, device="cpu",
        normalise=normalise, progress=progress,
    )  # fmt: skip
    params, nonzeros = count_parameters(v.model)
    return {
        "variant": v.name,
        "file": v.file.name,
        "size_bytes": v.file.stat().st_size,
        "zlib_bytes": zlib_size(v.file),
        "params": params,
        "nonzeros": nonzeros,
        "zeros": params - nonzeros,
        "sparsity": (params - nonzeros) / params if params else 0.0,
        "test_accuracy": res.accuracy,
        "test_loss": res.loss,
        "finetune": v.finetune,
    }


def format_markdown(report: dict[str, Any]) -> str:
    """The variants as a markdown table, with the measurement settings above it."""
    r = report
    lines = [
        f"{r['arch']}, {r['num_classes']} classes, from `{r['source']}`; test split "
        f"{r['test_images']} images at {r['image_size']} px; latency: median of {r['repeats']} "
        f"repeats, torch.set_num_threads({r['threads']}), ms per image at batch 1 and "
        f"{r['batch']}; torch {r['torch']}",
        "",
        "| variant | file MB | × float | zlib MB | × float | params | non-zeros | sparsity | "
        f"test acc. | Δ acc. | ms/img b1 | × float | ms/img b{r['batch']} | × float |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for v in r["variants"]:
        lines.append(
            f"| {v['variant']} | {v['size_bytes'] / 1e6:.2f} | {v['size_bytes_vs_float']:.2f} | "
            f"{v['zlib_bytes'] / 1e6:.2f} | {v['zlib_bytes_vs_float']:.2f} | {v['params']:,} | "
            f"{v['nonzeros']:,} | {v['sparsity']:.3f} | {v['test_accuracy']:.3f} | "
            f"{v['test_accuracy_delta']:+.3f} | {v['ms_per_image_b1']:.2f} | "
            f"{v['ms_per_image_b1_vs_float']:.2f} | {v['ms_per_image_batch']:.2f} | "
            f"{v['ms_per_image_batch_vs_float']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(report: dict[str, Any], out: Path) -> str:
    """Write ``compress.md``, ``compress.csv`` and ``compress.json`` into ``out``."""
    text = format_markdown(report)
    write_text_atomic(out / C.COMPRESS_MD, text)
    rows: Sequence[dict[str, Any]] = report["variants"]
    fields = [k for k in rows[0] if k != "finetune"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / C.COMPRESS_CSV, table.getvalue())
    write_json_atomic(out / C.COMPRESS_JSON, report)
    return text
