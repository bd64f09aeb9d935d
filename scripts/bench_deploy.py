"""Per-round overhead of deployment over gRPC against the Ray simulation, same experiment.

Runs one tiny experiment (3 clients, ShuffleNetV2 x0.5 from random weights at 32 px, a few local
steps, federated evaluation on) twice in this run: in the Ray simulation, and on loopback
deployment (`fedvision server` with TLS, three `fedvision client` processes,
`fedvision run runtime=deployment`). Both sides train 1 torch thread per client process, so the
work is the same; the difference of the mean round times is what deployment adds per round
(messages through the SuperLink and SuperNodes, polling, TLS). Rounds after the first are
compared (the first includes the clients' warm-up on both sides). Last line: JSON.

``--database file`` (the default, what ``fedvision server --database`` runs) keeps the
SuperLink's state in SQLite on disk; ``--database memory`` starts it without a database
(Flower's in-memory state: nothing survives a SuperLink restart).

    .venv/bin/python scripts/bench_deploy.py [--rounds 6] [--clients 3] [--database memory]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.report.metrics import read_metrics
from fedvision.runner import run_experiment
from fedvision.runtime.certs import make_certs
from fedvision.runtime.deploy import ServerOptions, start_server, stop_group


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--database", choices=("file", "memory"), default="file")
    args = ap.parse_args()
    os.environ.update(
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", OMP_NUM_THREADS="1",
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    os.environ.setdefault("FEDVISION_HOME", str(tmp / "home"))
    os.environ["FLWR_HOME"] = str(tmp / "flwr")
    data = generate_dataset(
        tmp / "gen", num_classes=6, num_source=2, train_per_class=150, val_per_class=25,
        size=32, workers=1, progress=False,
    )  # fmt: skip
    base = [
        f"data.root={data}", f"data.classes_file={data / 'target_classes.txt'}", "data.size=32",
        f"num_clients={args.clients}", f"num_rounds={args.rounds}", "partition=iid",
        "model=shufflenet_v2_x0_5", "model.weights=none", "client.local_steps=5",
        "client.augment=none", "strategy.fraction_evaluate=1.0", "strategy.min_evaluate_nodes=1",
        "progress=false",
    ]  # fmt: skip
    sim_dir = tmp / "sim"
    run_experiment(compose_config(base), sim_dir)

    certs = tmp / "certs"
    make_certs(certs, ["localhost", "127.0.0.1"], node_keys=args.clients)
    fleet, control = _port(), _port()
    server = start_server(
        ServerOptions(certs=certs, fleet=f"127.0.0.1:{fleet}",
                      database=tmp / "state.db" if args.database == "file" else None,
                      port=control, log=tmp / "superlink.log", flwr_home=tmp / "flwr-admin",
                      register=sorted((certs / "node-keys").glob("*.pub")))
    )  # fmt: skip
    clients = []
    try:
        for pid in range(args.clients):
            cmd = [sys.executable, "-m", "fedvision.cli", "client", "--server",
                   f"localhost:{fleet}", "--partition-id", str(pid), "--root-certificates",
                   str(certs / "ca.pem"), "--auth-key", str(certs / "node-keys" / f"node-{pid}"),
                   "--port", str(_port()), "--threads", "1",
                   "--device", "cpu", "--log", str(tmp / f"supernode-{pid}.log")]  # fmt: skip
            clients.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True))
        dep_dir = tmp / "deploy"
        run_experiment(
            compose_config([*base, "runtime=deployment", f"runtime.server=localhost:{control}",
                            f"runtime.root_certificates={certs / 'ca.pem'}",
                            "runtime.client_device=cpu"]),
            dep_dir,
        )  # fmt: skip
    finally:
        for c in clients:
            stop_group(c, 5.0)
        server.stop()

    def rounds(d: Path) -> list[float]:
        return [float(r["round_s"]) for r in read_metrics(d)[2:]]

    sim, dep = rounds(sim_dir), rounds(dep_dir)
    same = [r["test_accuracy"] for r in read_metrics(sim_dir)] == [
        r["test_accuracy"] for r in read_metrics(dep_dir)
    ]
    out = {
        "rounds_compared": len(sim),
        "sim_round_s": round(statistics.mean(sim), 3),
        "deploy_round_s": round(statistics.mean(dep), 3),
        "overhead_per_round_s": round(statistics.mean(dep) - statistics.mean(sim), 3),
        "deploy_over_sim": round(statistics.mean(dep) / statistics.mean(sim), 3),
        "same_test_accuracy_every_round": same,
        "database": args.database,
    }
    print(f"simulation  {sim}\ndeployment  {dep}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
