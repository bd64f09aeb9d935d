"""``fedvision certs``, ``server`` and ``client``: a real Flower federation over gRPC."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fedvision.errors import FedvisionError

if TYPE_CHECKING:  # the runtime (and Flower) load when a command runs
    from fedvision.runtime.deploy import ServerOptions


def certs(ns: argparse.Namespace) -> int:
    """Write the CA, the server certificate and the node keys; list the files."""
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


# ``--database memory``: the SuperLink keeps its state in memory (Flower's default without one).
IN_MEMORY = "memory"


def server_options(ns: argparse.Namespace) -> ServerOptions:
    """What ``fedvision server``'s arguments start."""
    from fedvision.runtime.deploy import ServerOptions

    return ServerOptions(
        certs=ns.certs,
        insecure=ns.insecure,
        database=None if str(ns.database) == IN_MEMORY else ns.database,
        fleet=ns.fleet,
        host=ns.host,
        port=ns.port,
        register=list(ns.register or ()),
        log=ns.log,
    )


def server(ns: argparse.Namespace) -> int:
    """Run a SuperLink until Ctrl-C or SIGTERM; a SuperLink that dies on its own is an error."""
    from fedvision.runtime.deploy import start_server

    if ns.insecure:
        print(
            "fedvision: WARNING: --insecure: no TLS and no node authentication: weights and "
            "metrics cross the network in plain text, and any machine that reaches the Fleet "
            "API can join and claim any partition no other node holds",
            file=sys.stderr,
        )
    opts = server_options(ns)
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


def client(ns: argparse.Namespace) -> int:
    """Run a SuperNode and its task worker for one partition until Ctrl-C or SIGTERM."""
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``certs``, ``server`` and ``client`` and their options."""
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
    crt.set_defaults(handler=certs)

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
        help=f"SQLite state file (superlink.db); {IN_MEMORY!r}: state in memory, lost on a "
        "restart (registered keys too), faster rounds (scripts/bench_deploy.py)",
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
    srv.set_defaults(handler=server)

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
    cli.set_defaults(handler=client)
