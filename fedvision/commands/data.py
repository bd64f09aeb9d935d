"""``fedvision data ...``: generate, check, prepare, partition and download datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generate(ns: argparse.Namespace) -> int:
    """Write (or reuse) the built-in dataset; print its folder."""
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


def check(ns: argparse.Namespace) -> int:
    """Scan a tree and print its report; exit status 1 when any file is unreadable."""
    from fedvision.data.check import check_tree, format_report

    report = check_tree(
        ns.root, header_only=ns.header_only, workers=ns.workers, progress=not ns.quiet
    )
    print(json.dumps(report.to_dict()) if ns.json else format_report(report))
    return 1 if report.to_dict()["unreadable"] else 0


def prepare(ns: argparse.Namespace) -> int:
    """Decode a tree (default: the built-in dataset) into the uint8 cache; print a summary."""
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


def partition(ns: argparse.Namespace) -> int:
    """Partition the labels as the run's overrides say; print the per-client table."""
    from fedvision.partition_cmd import partition_command

    print(partition_command(ns.overrides, ns.out, progress=not ns.quiet))
    return 0


def download(ns: argparse.Namespace) -> int:
    """Download (or take ``--archive``), verify and unpack a dataset; print what was done."""
    from fedvision.data.download import download_dataset, format_download

    result = download_dataset(
        ns.dataset,
        ns.out,
        size=ns.size,
        url=ns.url,
        archive=ns.archive,
        progress=not ns.quiet,
    )
    print(format_download(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` and its subcommands with their options."""
    data = sub.add_parser("data", help="generate, check, prepare, partition and download datasets")
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
    g.set_defaults(handler=generate)

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
    c.set_defaults(handler=check)

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
    r.set_defaults(handler=prepare)

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
    t.set_defaults(handler=partition)

    w = dsub.add_parser(
        "download",
        help="download Imagenette, Imagewoof or CIFAR-10 into an ImageNet-style tree",
        description="Download fastai's Imagenette or Imagewoof (160 px, 320 px or full size) or "
        "CIFAR-10 into DIR: resumable (DIR/.partial/), verified (the published checksum where "
        "one is known, else a full read of the archive; its sha256 is printed and written to "
        "DIR/<archive>.sha256) and unpacked atomically. Imagenette/Imagewoof keep fastai's "
        "train/<wnid>/*.JPEG and val/ layout; CIFAR-10 becomes DIR/cifar10/{train,val}/<class>/ "
        "PNGs (val = the official test batch). A complete folder is skipped. Offline, pass "
        "--archive FILE downloaded elsewhere.",
    )
    w.add_argument("dataset", choices=("imagenette", "imagewoof", "cifar10"))
    w.add_argument("--out", type=Path, required=True, metavar="DIR", help="receives the dataset")
    w.add_argument(
        "--size",
        choices=("160", "320", "full"),
        default=None,
        help="imagenette/imagewoof image size (160)",
    )
    w.add_argument("--url", default=None, help="download from this address (a mirror)")
    w.add_argument(
        "--archive", type=Path, default=None, metavar="FILE", help="use this archive, no download"
    )
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(handler=download)
