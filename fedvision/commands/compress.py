"""``fedvision compress``: prune and int8-quantize a run's global model, and measure it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compress(ns: argparse.Namespace) -> int:
    """Build the variants the options ask for; print their table."""
    from fedvision.compress import CompressSpec, compress_run, format_markdown

    spec = CompressSpec(
        prune=tuple(ns.prune or ()),
        structured=tuple(ns.structured or ()),
        norm=ns.norm,
        quantize=ns.quantize,
        finetune_epochs=ns.finetune_epochs,
        finetune_lr=ns.finetune_lr,
        device=ns.device,
        calib_images=ns.calib_images,
        repeats=ns.repeats,
        batch=ns.batch,
        threads=ns.threads,
    )
    report = compress_run(
        ns.source, ns.out, spec, checkpoint=ns.checkpoint, run_dir=ns.run, progress=not ns.quiet
    )
    print(format_markdown(report), end="")
    print(f"wrote {report['out']}: the variants, compress.md, .csv, .json", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``compress`` and its options."""
    cmp = sub.add_parser(
        "compress",
        help="prune and int8-quantize a run's global model; size, accuracy, CPU latency table",
        description="Compress the global model of a run (its checkpoint_best.pt, or a checkpoint "
        "file): global unstructured magnitude pruning (--prune), L1/L2 channel pruning of every "
        "conv layer (--structured), each optionally fine-tuned centrally afterwards, and int8 "
        "post-training quantization (--quantize, calibrated on training images). Every variant "
        "is saved (pruned ones load with `fedvision run model.weights=FILE`) and measured "
        "against the uncompressed model: bytes on disk, parameters and non-zeros, test accuracy, "
        "CPU ms per image at batch 1 and --batch.",
    )
    cmp.add_argument("source", type=Path, help="a run directory or a checkpoint file")
    cmp.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="(best)")
    cmp.add_argument("--run", type=Path, default=None, help="run of a checkpoint file (its dir)")
    cmp.add_argument("--prune", type=float, nargs="+", metavar="S", help="e.g. 0.5 0.8")
    cmp.add_argument("--structured", type=float, nargs="+", metavar="S", help="e.g. 0.3")
    cmp.add_argument("--norm", type=int, choices=(1, 2), default=1, help="channel ranking (L1)")
    cmp.add_argument("--quantize", action="store_true", help="add an int8 variant (x86, FX PTQ)")
    cmp.add_argument("--finetune-epochs", type=int, default=0, help="after pruning (0)")
    cmp.add_argument("--finetune-lr", type=float, default=0.01, help="(0.01)")
    cmp.add_argument("--device", default="auto", help="fine-tune device (auto)")
    cmp.add_argument("--calib-images", type=int, default=256, help="int8 calibration (256)")
    cmp.add_argument("--repeats", type=int, default=20, help="timed passes per model (20)")
    cmp.add_argument("--batch", type=int, default=64, help="the larger latency batch (64)")
    cmp.add_argument("--threads", type=int, default=1, help="torch threads while timing (1)")
    cmp.add_argument("--out", type=Path, default=None, help="output folder (RUN/compress)")
    cmp.add_argument("--quiet", action="store_true", help="no progress on stderr")
    cmp.set_defaults(handler=compress)
