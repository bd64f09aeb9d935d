"""The ``fedvision`` command: ``run`` (Hydra), ``report`` and the ``data`` commands.

Orchestration only; each handler calls one layer and prints what it returns.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedvision import __version__
from fedvision.errors import FedvisionError

RUN_HELP = """\
Federated fine-tuning in a Flower simulation on Ray. Takes Hydra overrides (key=value,
group=option); `fedvision run --help` lists the config groups and keys.
Examples: fedvision run num_rounds=20 strategy=fedprox strategy.proximal_mu=0.01
          fedvision run -m partition.alpha=0.1,0.5,1.0        (a sweep)
          fedvision run resume=outputs/2026-11-27/10-00-00   (continue a run)"""


def _run(argv: Sequence[str]) -> int:
    """Hand the overrides to the Hydra task (Hydra parses --help, -m, --cfg itself)."""
    from fedvision.runner import check_resume_dir, hydra_main

    args = list(argv)
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if resume:
        # Checked before Hydra runs: Hydra creates its output folder first, and a resume must
        # neither create a wrong path nor overwrite the original run's .hydra/ record.
        check_resume_dir(resume[-1])
        args = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
        args += [f"hydra.run.dir={resume[-1]}", "hydra.output_subdir=null"]
    sys.argv = ["fedvision run", *args]
    hydra_main()
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from fedvision.data.generate import generate_dataset

    root = generate_dataset(
        ns.out,
        num_classes=ns.classes,
        num_source=ns.source_classes,
        train_per_class=ns.train_per_class,
        val_per_class=ns.val_per_class,
        size=ns.size,
        seed=ns.seed,
        workers=ns.workers,
        overwrite=ns.overwrite,
        progress=not ns.quiet,
    )
    print(root)
    return 0


def _check(ns: argparse.Namespace) -> int:
    from fedvision.data.check import check_tree, format_report

    report = check_tree(
        ns.root, header_only=ns.header_only, workers=ns.workers, progress=not ns.quiet
    )
    print(json.dumps(report.to_dict()) if ns.json else format_report(report))
    return 1 if report.to_dict()["unreadable"] else 0


def _prepare(ns: argparse.Namespace) -> int:
    from fedvision.data.cache import format_prepare, prepare_dataset
    from fedvision.data.folder import ClassSelection
    from fedvision.data.generate import generate_dataset

    root = ns.root if ns.root is not None else generate_dataset(progress=not ns.quiet)
    selection = None
    if ns.first_n is not None or ns.wnids or ns.classes_file is not None:
        selection = ClassSelection.from_config(
            first_n=ns.first_n, wnids=ns.wnids, file=ns.classes_file
        )
    prepared = prepare_dataset(
        root,
        ns.out,
        size=ns.size,
        selection=selection,
        max_per_class=ns.max_per_class,
        workers=ns.workers,
        progress=not ns.quiet,
    )
    print(format_prepare(prepared))
    return 0


def _partition(ns: argparse.Namespace) -> int:
    from fedvision.partition_cmd import partition_command

    print(partition_command(ns.overrides, ns.out, progress=not ns.quiet))
    return 0


def _report(ns: argparse.Namespace) -> int:
    from fedvision.report.table import write_report

    print(write_report(ns.dirs, ns.out, target=ns.target), end="")
    print(f"wrote {ns.out}/report.md, report.csv, report.png", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedvision`` command."""
    p = argparse.ArgumentParser(
        prog="fedvision",
        description="Federated fine-tuning of pretrained CNNs on ImageNet-style data (Flower).",
    )
    p.add_argument("--version", action="version", version=f"fedvision {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a federated experiment (Hydra overrides)", description=RUN_HELP)

    rep = sub.add_parser(
        "report",
        help="tables and a plot over run and sweep directories (mean ± std over seeds)",
        description="Group the runs under DIR... by their settings (all but the seed) and write "
        "a markdown table, a CSV and a plot of test accuracy per round: per group the mean and "
        "standard deviation over seeds of final test accuracy, test accuracy at the best "
        "validation round, rounds to reach --target, bytes moved and wall time. Failed or "
        "unfinished runs are listed, never averaged.",
    )
    rep.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (report)")
    rep.add_argument("--target", type=float, default=0.5, help="test accuracy to reach (0.5)")
    rep.set_defaults(handler=_report)

    data = sub.add_parser("data", help="generate, check, prepare and partition datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    g = dsub.add_parser(
        "generate",
        help="write the built-in procedural dataset",
        description="Write the built-in procedural ImageNet-style dataset (train/ and val/ with "
        "synset folders, source and target class lists). Reuses an identical existing one.",
    )
    g.add_argument("--out", type=Path, default=None, help="folder (default: $FEDVISION_HOME)")
    g.add_argument("--classes", type=int, default=30, help="number of classes (default 30)")
    g.add_argument("--source-classes", type=int, default=20, help="pretraining classes (20)")
    g.add_argument("--train-per-class", type=int, default=300)
    g.add_argument("--val-per-class", type=int, default=50)
    g.add_argument("--size", type=int, default=64, help="stored image size in px (64)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--overwrite", action="store_true", help="replace a different dataset there")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(handler=_generate)

    c = dsub.add_parser(
        "check",
        help="scan a dataset tree and report classes, modes, sizes and unreadable files",
        description="Scan an ImageFolder/ImageNet tree: classes, images per split and class, "
        "image modes and sizes, and every unreadable file. Exit status 1 when any is unreadable.",
    )
    c.add_argument("root", type=Path)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--header-only", action="store_true", help="read headers only (fast, ImageNet)")
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(handler=_check)

    r = dsub.add_parser(
        "prepare",
        help="decode a dataset once into the uint8 memory-mapped cache",
        description="Decode, resize (shorter side) and centre-crop every image once into a "
        "uint8 memmap cache; resumable; corrupt files are skipped, counted and listed.",
    )
    r.add_argument("root", type=Path, nargs="?", default=None, help="(default: built-in dataset)")
    r.add_argument("--out", type=Path, default=None, help="cache folder (default: $FEDVISION_HOME)")
    r.add_argument("--size", type=int, default=64, help="output size in px (64)")
    r.add_argument("--first-n", type=int, default=None, help="only the first N classes")
    r.add_argument("--wnids", nargs="+", default=None, help="only these classes")
    r.add_argument("--classes-file", type=Path, default=None, help="only the wnids in this file")
    r.add_argument("--max-per-class", type=int, default=None, help="cap images per class")
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(handler=_prepare)

    t = dsub.add_parser(
        "partition",
        help="split a dataset's labels into non-IID client partitions (Hydra overrides)",
        description="Partition the training labels exactly as `fedvision run` would, print the "
        "per-client table, and write partition.npz, partition_stats.md and a heatmap PNG. Takes "
        "the run's overrides, e.g. partition=dirichlet partition.alpha=0.1 num_clients=20 "
        "data.root=/data/imagenet.",
    )
    t.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, group=option)")
    t.add_argument("--out", type=Path, default=Path("partitions"), help="output folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(handler=_partition)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedvision`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = None if argv and argv[0] == "run" else build_parser().parse_args(argv)
    try:
        if ns is None:
            return _run(argv[1:])  # Hydra owns the rest of the command line
        return int(ns.handler(ns))
    except FedvisionError as exc:
        print(f"fedvision: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
