"""The ``fedvision`` command: ``run`` and ``pretrain`` (Hydra), ``report``, ``data`` commands.

Orchestration only; each handler calls one layer and prints what it returns.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
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

    sys.argv = ["fedvision run", *_hydra_args(list(argv), check_resume_dir)]
    hydra_main()
    return 0


PRETRAIN_HELP = """\
Centralised pretraining of a torchvision CNN (default: the built-in source classes). Takes Hydra
overrides; `fedvision pretrain --help` lists the keys. Its checkpoint_best.pt is what
`fedvision run model.weights=PATH` fine-tunes (the head is replaced for the target classes).
Examples: fedvision pretrain recipe.epochs=20 recipe.optimizer=adamw recipe.lr=2e-3
          fedvision pretrain data.root=/data/imagenet data.first_n=100 data.size=128
          fedvision pretrain resume=outputs/pretrain/2026-11-28/10-00-00"""


def _hydra_args(args: list[str], check: Callable[[str], Path]) -> list[str]:
    """A resume runs in its own directory, checked before Hydra creates anything."""
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not resume:
        return args
    # Hydra creates its output folder first, and a resume must neither create a wrong path nor
    # overwrite the original run's .hydra/ record.
    check(resume[-1])
    args = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*args, f"hydra.run.dir={resume[-1]}", "hydra.output_subdir=null"]


def _pretrain(argv: Sequence[str]) -> int:
    from fedvision.pretrain import check_pretrain_resume, hydra_pretrain

    sys.argv = ["fedvision pretrain", *_hydra_args(list(argv), check_pretrain_resume)]
    hydra_pretrain()
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


def _download(ns: argparse.Namespace) -> int:
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


def _report(ns: argparse.Namespace) -> int:
    from fedvision.report.table import write_report

    group_by = [k.strip() for k in ns.group_by.split(",") if k.strip()] if ns.group_by else None
    text = write_report(ns.dirs, ns.out, target=ns.target, group_by=group_by, sort_by=ns.sort_by)
    print(text, end="")
    plots = sorted(p.name for p in ns.out.glob("report*.png"))
    print(f"wrote {ns.out}/report.md, report.csv, {', '.join(plots)}", file=sys.stderr)
    return 0


def _compress(ns: argparse.Namespace) -> int:
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


def _certs(ns: argparse.Namespace) -> int:
    from fedvision.runtime.certs import format_certs, make_certs

    hosts = ns.host or ["localhost", "127.0.0.1"]
    files = make_certs(ns.out, hosts, node_keys=ns.node_keys, days=ns.days, overwrite=ns.overwrite)
    print(format_certs(files))
    return 0


def client_log(partition_id: int) -> Path:
    """A client's default SuperNode log: one per partition, so clients on one host keep apart."""
    return Path(f"supernode-{partition_id}.log")


def _until_signal(stop: threading.Event) -> None:
    """Set ``stop`` on Ctrl-C or SIGTERM (a service manager's stop) instead of dying mid-way."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def _server(ns: argparse.Namespace) -> int:
    from fedvision.runtime.deploy import ServerOptions, start_server

    if ns.insecure:
        print(
            "fedvision: WARNING: --insecure: no TLS and no node authentication: weights and "
            "metrics cross the network in plain text, and any machine that reaches the Fleet "
            "API can join and claim any partition no other node holds",
            file=sys.stderr,
        )
    opts = ServerOptions(
        certs=ns.certs,
        insecure=ns.insecure,
        database=ns.database,
        fleet=ns.fleet,
        host=ns.host,
        port=ns.port,
        register=list(ns.register or ()),
        log=ns.log,
    )
    stop = threading.Event()
    _until_signal(stop)
    child = start_server(opts)
    print(
        f"fedvision: server up: clients connect to port {opts.fleet.rsplit(':', 1)[-1]} "
        f"(fedvision client --server THIS_HOST:{opts.fleet.rsplit(':', 1)[-1]}), runs are "
        f"submitted to {opts.control_address()} (runtime.server=...); log {opts.log}; "
        "Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    if opts.auth:
        print(
            f"fedvision: node authentication on: {len(opts.register)} key(s) registered now; "
            "only keys registered with this --database join (--register KEY.pub)",
            file=sys.stderr,
            flush=True,
        )
        for key, node in child.node_ids.items():  # the node ids that runs' nodes.jsonl name
            said = "was registered before" if node is None else f"is node {node}"
            print(f"fedvision: {key} {said}", file=sys.stderr, flush=True)
    try:
        while not stop.is_set() and child.alive():
            stop.wait(0.5)
    finally:
        child.stop()
    if not stop.is_set():
        raise FedvisionError(
            f"the SuperLink exited with code {child.proc.returncode}; see {opts.log}"
        )
    print("fedvision: server stopped", file=sys.stderr)
    return 0


def _client(ns: argparse.Namespace) -> int:
    from fedvision import constants as C
    from fedvision.runtime.deploy import ClientOptions, run_client

    node: dict[str, str | int] = {C.NODE_DEVICE: ns.device}
    if ns.data is not None:
        from fedvision.data.local import prepare_client_data

        local = prepare_client_data(
            ns.data,
            size=ns.size,
            classes_file=ns.classes_file,
            val_fraction=ns.val_fraction,
            seed=ns.partition_id,
            progress=not ns.quiet,
        )
        node.update(local)
    for key, value in (
        (C.NODE_CACHE_DIR, ns.cache_dir),
        (C.NODE_PARTITION_FILE, ns.partition_file),
        (C.NODE_INITIAL_WEIGHTS, ns.initial_weights),
    ):
        if value is not None:
            node[key] = str(Path(value).resolve())
    if ns.threads is not None:
        import torch

        torch.set_num_threads(ns.threads)
    opts = ClientOptions(
        server=ns.server,
        partition_id=ns.partition_id,
        certs=ns.root_certificates,
        insecure=ns.insecure,
        auth_key=ns.auth_key,
        port=ns.port,
        node_config=node,
        heartbeat_s=ns.heartbeat,
        max_wait_s=ns.max_wait,
        log=ns.log or client_log(ns.partition_id),
    )
    opts.check()  # bad options in one line, before any output or process
    if ns.insecure:
        print(
            "fedvision: WARNING: --insecure: no TLS and no node key: this client's weights "
            "cross the network in plain text to whoever answers at the server's address",
            file=sys.stderr,
        )
    stop = threading.Event()
    _until_signal(stop)
    print(
        f"fedvision: client {ns.partition_id} connecting to {ns.server} (log {opts.log}); "
        "Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    tasks = run_client(opts, stop)
    print(f"fedvision: client {ns.partition_id} stopped after {tasks} tasks", file=sys.stderr)
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
    sub.add_parser(
        "pretrain",
        help="centralised pretraining, e.g. on the built-in source classes (Hydra overrides)",
        description=PRETRAIN_HELP,
    )

    rep = sub.add_parser(
        "report",
        help="tables and a plot over run and sweep directories (mean ± std over seeds)",
        description="Group the runs under DIR... by their settings (all but the seed) and write "
        "a markdown table, a CSV and a plot of test accuracy per round: per group the mean and "
        "standard deviation over seeds of the partitions' label TV (distance from IID), final "
        "test accuracy, test accuracy at the best "
        "validation round, rounds to reach --target, bytes moved and wall time. Failed or "
        "unfinished runs are listed, never averaged.",
    )
    rep.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (report)")
    rep.add_argument("--target", type=float, default=0.5, help="test accuracy to reach (0.5)")
    rep.add_argument(
        "--group-by",
        metavar="KEYS",
        help="group only by these comma-separated config keys or groups (e.g. "
        "partition.alpha,strategy); runs differing in anything else are pooled",
    )
    rep.add_argument(
        "--sort-by",
        choices=("group", "accuracy", "heterogeneity"),
        default="group",
        help="row order: group name, test accuracy at best validation (best first) or label "
        "TV, the partition's distance from IID (IID first)",
    )
    rep.set_defaults(handler=_report)

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
    cmp.set_defaults(handler=_compress)

    crt = sub.add_parser(
        "certs",
        help="TLS certificates and SuperNode auth keys for a Flower deployment",
        description="Write a private CA (ca.pem, ca.key), a SuperLink server certificate "
        "signed by it for every --host (server.pem, server.key) and, with --node-keys N, "
        "SuperNode authentication key pairs in OpenSSH format (node-keys/node-i and "
        "node-i.pub, EC P-384). Private keys are written unencrypted with mode 0600.",
    )
    crt.add_argument("--out", type=Path, required=True, help="output folder")
    crt.add_argument(
        "--host",
        action="append",
        metavar="NAME_OR_IP",
        help="a DNS name or IP address of the SuperLink; repeat for several "
        "(default: localhost and 127.0.0.1)",
    )
    crt.add_argument("--node-keys", type=int, default=0, metavar="N", help="node key pairs (0)")
    crt.add_argument("--days", type=int, default=365, help="validity in days (365)")
    crt.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    crt.set_defaults(handler=_certs)

    srv = sub.add_parser(
        "server",
        help="start a SuperLink (Flower 1.39) that clients join over gRPC with TLS",
        description="Start flower-superlink with TLS from --certs (made by `fedvision certs`) "
        "and node authentication (only SuperNode keys given with --register, now or in an "
        "earlier start on the same --database, can join), a state database so that a "
        "restart keeps its state, the Fleet API for clients "
        "(--fleet, port 9092) and the Control API that `fedvision run runtime=deployment` "
        "submits to (127.0.0.1:8000 unless --host 0.0.0.0). Runs until Ctrl-C or SIGTERM, then "
        "stops the SuperLink and everything it started.",
    )
    srv.add_argument("--certs", type=Path, help="folder with ca.pem, server.pem, server.key")
    srv.add_argument("--insecure", action="store_true", help="no TLS (prints a warning)")
    srv.add_argument(
        "--database",
        type=Path,
        default=Path("superlink.db"),
        help="SQLite state file (superlink.db)",
    )
    srv.add_argument("--fleet", default="0.0.0.0:9092", help="Fleet API address (0.0.0.0:9092)")
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="Control API host (127.0.0.1; 0.0.0.0 for remote submission)",
    )
    srv.add_argument("--port", type=int, default=8000, help="Control API port (8000)")
    # Node authentication is always on with TLS; the flag stays so that older commands run.
    srv.add_argument("--enable-supernode-auth", action="store_true", help=argparse.SUPPRESS)
    srv.add_argument(
        "--register",
        type=Path,
        nargs="+",
        metavar="KEY.pub",
        help="register these SuperNode public keys once the server is up (only registered "
        "keys join: node authentication is on with TLS)",
    )
    srv.add_argument("--log", type=Path, default=Path("superlink.log"), help="(superlink.log)")
    srv.set_defaults(handler=_server)

    cli = sub.add_parser(
        "client",
        help="start a client (a Flower SuperNode) that joins a fedvision server over gRPC",
        description="Start a SuperNode for one client and run its training in this process. "
        "Data: --data DIR (the client's own ImageFolder: its natural partition, decoded into a "
        "local cache on first start, classes from --classes-file so that labels match the "
        "server's), or a shared dataset: --cache-dir and --partition-file from the server's run "
        "(or nothing on the server's machine: the run directory says). Retries while the "
        "server is not up; says so when the certificate does not match or the key is refused.",
    )
    cli.add_argument("--server", required=True, help="the server's Fleet API, HOST:9092")
    cli.add_argument("--partition-id", type=int, required=True, help="this client's id (0..N-1)")
    cli.add_argument("--root-certificates", type=Path, help="the federation's ca.pem (TLS)")
    cli.add_argument("--insecure", action="store_true", help="no TLS, no node key (a warning)")
    cli.add_argument(
        "--auth-key", type=Path, help="this node's private key (node-keys/node-i); TLS needs it"
    )
    cli.add_argument(
        "--port",
        type=int,
        default=9094,
        help="local Runtime API port, distinct per client on a host (9094)",
    )
    cli.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    cli.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    cli.add_argument("--data", type=Path, help="this client's own ImageFolder (train/ [val/])")
    cli.add_argument("--classes-file", type=Path, help="the federation's class list (wnids)")
    cli.add_argument("--size", type=int, default=64, help="decode size, the run's data.size (64)")
    cli.add_argument("--val-fraction", type=float, default=0.1, help="local validation (0.1)")
    cli.add_argument("--cache-dir", type=Path, help="shared dataset: a decoded train cache")
    cli.add_argument("--partition-file", type=Path, help="shared dataset: the run's partition.npz")
    cli.add_argument(
        "--initial-weights", type=Path, help="the run's initial_weights.pt (frozen layers, FedBN)"
    )
    cli.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        help="seconds between heartbeats; the server drops a node after 2 missed (10)",
    )
    cli.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="give up after this many seconds without the server (never)",
    )
    cli.add_argument(
        "--log",
        type=Path,
        default=None,
        help="the SuperNode's log (supernode-<partition id>.log: clients on one host keep apart)",
    )
    cli.add_argument("--quiet", action="store_true", help="no progress on stderr")
    cli.set_defaults(handler=_client)

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
    w.set_defaults(handler=_download)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedvision`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hydra_commands = {"run": _run, "pretrain": _pretrain}
    hydra_command = hydra_commands.get(argv[0]) if argv else None
    ns = None if hydra_command else build_parser().parse_args(argv)
    try:
        if hydra_command is not None:
            return hydra_command(argv[1:])  # Hydra owns the rest of the command line
        return int(ns.handler(ns))
    except FedvisionError as exc:
        print(f"fedvision: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
