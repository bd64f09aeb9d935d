"""A real federation on loopback: a SuperLink and three SuperNodes as processes, TLS and node
authentication on (as ``fedvision server`` always has them without ``--insecure``).

Marked ``grpc`` (run by ``bash .ci/run``: ``pytest -m grpc``). Every process a test starts is
in its own process group and is stopped when the test ends, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.report.metrics import read_metrics
from fedvision.rundir import read_status
from fedvision.runner import run_experiment
from fedvision.runtime.certs import make_certs
from fedvision.runtime.deploy import ServerOptions, start_server, stop_group

pytestmark = pytest.mark.grpc
FLOWER = "flower-superlink|flower-supernode|flower-superexec|flwr-|fedvision.runtime.supernode"
NUM = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("data") / "gen", num_classes=6, num_source=2,
        train_per_class=150, val_per_class=25, size=32, workers=1, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, ["localhost", "127.0.0.1"], node_keys=NUM + 1)  # node-3: another registered key
    other = tmp_path_factory.mktemp("other-ca")
    make_certs(other, ["localhost", "127.0.0.1"], node_keys=1)
    return out, other


def overrides(dataset, **extra) -> list[str]:
    base = {
        "data.root": str(dataset), "data.classes_file": str(dataset / "target_classes.txt"),
        "data.size": 32, "data.workers": 1, "num_clients": NUM, "num_rounds": 2,
        "partition": "iid", "model": "shufflenet_v2_x0_5", "model.weights": "none",
        "client.local_steps": 3, "client.augment": "none", "progress": False,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class Federation:
    """A SuperLink and SuperNodes on loopback, each a process group; ``close`` stops them all."""

    def __init__(self, tmp: Path, certs: Path) -> None:
        self.tmp, self.certs = tmp, certs
        self.fleet, self.control = _free_port(), _free_port()
        self.database = tmp / "state.db"
        self.server = None
        self.clients: dict[int, subprocess.Popen] = {}

    def start_server(self) -> None:
        keys = sorted((self.certs / "node-keys").glob("*.pub"))
        self.server = start_server(
            ServerOptions(
                certs=self.certs, database=self.database, fleet=f"127.0.0.1:{self.fleet}",
                port=self.control, register=keys, log=self.tmp / "superlink.log",
                flwr_home=self.tmp / "flwr-admin",
            )
        )  # fmt: skip

    def client_cmd(self, pid: int, ca: Path, key: Path) -> list[str]:
        cmd = [sys.executable, "-m", "fedvision.cli", "client", "--server",
               f"localhost:{self.fleet}", "--partition-id", str(pid), "--root-certificates",
               str(ca), "--port", str(_free_port()), "--threads", "1", "--device", "cpu",
               "--auth-key", str(key), "--log", str(self.tmp / f"supernode-{pid}.log")]  # fmt: skip
        return cmd

    def start_client(self, pid: int, key: int | None = None, name: int | None = None, extra=()):
        """Client ``name`` for partition ``pid`` with node key ``key`` (both default ``pid``)."""
        key = pid if key is None else key
        name = pid if name is None else name
        cmd = self.client_cmd(pid, self.certs / "ca.pem", self.certs / "node-keys" / f"node-{key}")
        cmd[cmd.index("--log") + 1] = str(self.tmp / f"supernode-{name}.log")
        with (self.tmp / f"client-{name}.err").open("w") as err:
            self.clients[name] = subprocess.Popen(
                [*cmd, *extra], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )

    def kill_client(self, pid: int) -> None:
        stop_group(self.clients[pid], timeout_s=0.0)  # SIGKILL at once: a crash

    def kill_server(self) -> None:
        stop_group(self.server.proc, timeout_s=0.0)

    def runtime(self) -> dict[str, str]:
        return {
            "runtime": "deployment", "runtime.server": f"localhost:{self.control}",
            "runtime.root_certificates": str(self.certs / "ca.pem"),
            "runtime.client_device": "cpu", "runtime.connect_timeout_s": 120,
        }  # fmt: skip

    def report(self) -> str:
        """Each client's state and the last lines of its SuperNode log: why a test failed."""
        out = []
        for pid, proc in sorted(self.clients.items()):
            code = proc.poll()
            out.append(f"client {pid}: " + ("running" if code is None else f"exited {code}"))
            for name in (f"client-{pid}.err", f"supernode-{pid}.log"):
                path = self.tmp / name
                text = path.read_text(errors="replace") if path.exists() else ""
                text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Flower's colours
                lines = [ln for ln in text.splitlines() if ln.strip()]
                out += [f"  {name}: {ln[:200]}" for ln in lines[-12:]]
        return "\n".join(out)

    def close(self) -> None:
        for proc in self.clients.values():
            stop_group(proc, timeout_s=5.0)
        if self.server is not None:
            self.server.stop()


def _nothing_left(tmp: Path, fleet: int) -> bool:
    # Every process of a test names its tmp_path (logs, database) or its Fleet API port.
    pattern = f"{tmp}|:{fleet}( |$)"
    for _ in range(50):
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        if not found.stdout.strip():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def federation(tmp_path, certs, monkeypatch, request):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fed = Federation(tmp_path, certs[0])
    yield fed
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(fed.report())  # shown with the failure: the clients' side of the story
    fed.close()
    assert _nothing_left(tmp_path, fed.fleet)


@pytest.fixture(scope="module")
def simulated(dataset, tmp_path_factory):
    """The same experiment in the Ray simulation: the reference for the deployment runs."""
    run_dir = tmp_path_factory.mktemp("sim")
    run_experiment(compose_config(overrides(dataset, num_rounds=3)), run_dir)
    return run_dir


def test_tls_run_equals_the_simulation_exactly(dataset, federation, simulated, tmp_path):
    federation.start_server()
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    summary = run_experiment(
        compose_config(overrides(dataset, num_rounds=3, **federation.runtime())), run_dir
    )
    assert summary["rounds_done"] == 3
    got, want = read_metrics(run_dir), read_metrics(simulated)
    for g, w in zip(got, want, strict=True):
        for key in ("test_accuracy", "test_loss", "val_accuracy", "train_loss", "clients"):
            assert g.get(key) == w.get(key), (key, g, w)  # exactly: the same float ops on the CPU
    a = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    b = torch.load(simulated / C.CKPT_LATEST, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_scaffold_over_tls_equals_the_simulation_so_client_state_persists(
    dataset, federation, tmp_path
):
    # SCAFFOLD's c_i lives in each SuperNode's Context between rounds (through the warm task
    # worker): had round 1's c_i been lost, round 2 would train with another correction and
    # the metrics would part from the simulation's.
    extra = {"strategy": "scaffold", "client.momentum": 0.0}
    sim_dir = tmp_path / "sim"
    run_experiment(compose_config(overrides(dataset, num_rounds=3, **extra)), sim_dir)
    federation.start_server()
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    cfg = overrides(dataset, num_rounds=3, **extra, **federation.runtime())
    assert run_experiment(compose_config(cfg), run_dir)["rounds_done"] == 3
    got, want = read_metrics(run_dir), read_metrics(sim_dir)
    for g, w in zip(got, want, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss"):
            assert g.get(key) == w.get(key), (key, g, w)


def test_a_client_killed_mid_round_is_recorded_and_the_run_finishes(dataset, federation, tmp_path):
    federation.start_server()
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    cfg = overrides(
        dataset, num_rounds=4, min_train_replies=2, **{"client.local_steps": 40},
        **{"runtime.round_timeout_s": 120},
        **federation.runtime(),
    )  # fmt: skip
    proc = _submit(run_dir, cfg)
    try:
        _wait_for_round(run_dir, 1, proc)
        federation.kill_client(2)  # round 2 is training now
        out, _ = proc.communicate(timeout=400)
    finally:
        stop_group(proc, timeout_s=5.0)
    assert read_status(run_dir)["status"] == "finished", out
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    failed = [r for r in records[1:] if r["num_failures"]]
    assert failed and failed[0]["round"] == 2
    assert {f["partition"] for r in failed for f in r["failures"]} == {2}
    assert all(r["num_clients"] == 2 for r in records[2:])  # the others went on


def _submit(run_dir: Path, cfg: list[str]) -> subprocess.Popen:
    """`fedvision run` of ``cfg`` in the background, in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedvision.cli", "run", f"hydra.run.dir={run_dir}", *cfg],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_round(run_dir: Path, rnd: int, proc: subprocess.Popen, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()}")
        try:
            if any(r["round"] >= rnd for r in read_metrics(run_dir)):
                return
        except (ValueError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"round {rnd} did not finish within {timeout_s} s")


def test_server_killed_and_restarted_resumes_to_the_uninterrupted_metrics(
    dataset, federation, simulated, tmp_path
):
    federation.start_server()
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    cfg = overrides(dataset, num_rounds=3, **federation.runtime())
    proc = _submit(run_dir, cfg)
    try:
        _wait_for_round(run_dir, 1, proc)
        federation.kill_server()  # the SuperLink and the ServerApp with it
        proc.wait(timeout=120)
    finally:
        stop_group(proc, timeout_s=5.0)
    assert read_status(run_dir) is None or read_status(run_dir)["status"] != "finished"
    federation.start_server()  # the same database; the clients reconnect on their own
    summary = run_experiment(*_resumed(run_dir), resume_changes={})
    assert summary["rounds_done"] == 3
    got, want = read_metrics(run_dir), read_metrics(simulated)
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    for g, w in zip(got, want, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "clients"):
            assert g.get(key) == w.get(key), (key, g, w)


def test_ctrl_c_stops_a_deployment_run_at_its_round_and_resume_finishes_it(
    dataset, federation, simulated, tmp_path
):
    import signal

    federation.start_server()
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    proc = _submit(run_dir, overrides(dataset, num_rounds=3, **federation.runtime()))
    try:
        _wait_for_round(run_dir, 1, proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the submitting terminal
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=90)
    finally:
        stop_group(proc, timeout_s=5.0)
    assert proc.returncode == 130, out
    assert time.monotonic() - sent < 60
    status = read_status(run_dir)
    assert status["status"] == "interrupted" and status["round"] in (1, 2), status
    assert f"continue with resume={run_dir}" in out
    summary = run_experiment(*_resumed(run_dir), resume_changes={})  # the server ran on
    assert summary["rounds_done"] == 3
    got, want = read_metrics(run_dir), read_metrics(simulated)
    for g, w in zip(got, want, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "clients"):
            assert g.get(key) == w.get(key), (key, g, w)


def _resumed(run_dir: Path):
    from omegaconf import OmegaConf

    from fedvision.rundir import load_run_config

    cfg = OmegaConf.create(load_run_config(run_dir))
    cfg.resume = str(run_dir)
    return cfg, run_dir


def _online(fed: Federation) -> set[int]:
    """Node ids the SuperLink lists as online (`flwr supernode list`)."""
    from fedvision.runtime.deploy import flower_env

    done = subprocess.run(
        ["flwr", "supernode", "list", "fedvision", "--format", "json"],
        env=flower_env({"FLWR_HOME": str(fed.tmp / "flwr-admin")}),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    nodes = json.loads(done.stdout[done.stdout.index("{") :])["nodes"]
    return {int(n["node-id"]) for n in nodes if n["status"] == "online"}


def test_a_registered_node_claiming_a_held_partition_is_refused_and_sent_nothing(
    dataset, federation, tmp_path
):
    # The honest clients hold their partitions from round 1. Then a node with another
    # registered key (node-3) joins claiming partition 1, with its own data (the whole train
    # split, so its updates would differ). The resumed server knows the claim order from
    # nodes.jsonl: the attacker is refused, sent nothing, and every round aggregates the honest
    # three. Today's code let the newest claimant take the partition over.
    federation.start_server()
    ids = federation.server.node_ids
    honest = {pid: ids[federation.certs / "node-keys" / f"node-{pid}.pub"] for pid in range(NUM)}
    attacker = ids[federation.certs / "node-keys" / f"node-{NUM}.pub"]
    for pid in range(NUM):
        federation.start_client(pid)
    run_dir = tmp_path / "run"
    cfg = overrides(dataset, num_rounds=2, **federation.runtime())
    assert run_experiment(compose_config(cfg), run_dir)["rounds_done"] == 2
    data = ["--data", str(dataset), "--classes-file", str(dataset / "target_classes.txt"),
            "--size", "32", "--quiet"]  # fmt: skip
    federation.start_client(1, key=NUM, name=9, extra=data)
    deadline = time.monotonic() + 120
    while attacker not in _online(federation):
        assert time.monotonic() < deadline, federation.report()
        time.sleep(1.0)
    done = subprocess.run(
        [sys.executable, "-m", "fedvision.cli", "run", f"resume={run_dir}", "num_rounds=4"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = f"node {attacker} claims partition 1, held by node {honest[1]}: refused"
    assert said in done.stderr  # the submitting side tells it (the ServerApp runs remote)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["clients"] == [0, 1, 2] and not r.get("num_failures") for r in records[1:])
    events = [json.loads(x) for x in (run_dir / C.RUN_NODES).read_text().splitlines()]
    held = {(e["partition"], e["node"]) for e in events if e["event"] == "holds"}
    assert held == {(pid, node) for pid, node in honest.items()}  # in both server runs
    refused = [(e["node"], e["partition"], e["held_by"]) for e in events if e["event"] == "refused"]
    assert refused == [(attacker, 1, honest[1])]
    stop_group(federation.clients[9], timeout_s=10.0)  # SIGTERM: it says how many tasks
    err = (tmp_path / "client-9.err").read_text()
    assert "client 1 stopped after 1 tasks" in err  # the partition query, nothing to train


def test_unregistered_key_and_foreign_ca_are_refused_with_the_reason(
    dataset, tmp_path, certs, monkeypatch
):
    mine, other = certs
    fed = Federation(tmp_path, mine)
    try:
        fed.start_server()
        # A key the server never registered: refused, and the client says so and exits.
        done = subprocess.run(
            fed.client_cmd(0, mine / "ca.pem", other / "node-keys" / "node-0"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2
        assert "refused this node's key" in done.stderr and "register" in done.stderr
        # A client that trusts another CA: the handshake fails, and it says why.
        done = subprocess.run(
            fed.client_cmd(1, other / "ca.pem", mine / "node-keys" / "node-1"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2
        assert "not signed by the CA" in done.stderr
        # A registered key with the right CA joins: it is still running after the others left.
        fed.start_client(2)
        time.sleep(5)
        assert fed.clients[2].poll() is None
    finally:
        fed.close()
    assert _nothing_left(tmp_path, fed.fleet)


def test_deployment_config_errors_come_before_any_work(dataset, tmp_path):
    with pytest.raises(FedvisionError, match="root_certificates"):
        run_experiment(compose_config(overrides(dataset, runtime="deployment")), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert os.environ.get("FLWR_HOME")  # the conftest's private Flower home
