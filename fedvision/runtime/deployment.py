"""Run an experiment on a running federation (``fedvision server`` + clients) via ``flwr run``.

The launcher prepares the run directory as for a simulation, then submits the same apps to the
SuperLink's Control API with ``flwr run`` and the run directory in the run config. The ServerApp
runs beside the SuperLink and writes metrics, checkpoints and status into the run directory, so
the submitting machine must see that directory at the same path: submit on the server machine
(or over a shared filesystem). ``resume=`` submits again and continues from the last checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.report.metrics import read_metrics
from fedvision.rundir import describe_node_event, load_run_config, read_node_events, read_status
from fedvision.runtime.deploy import CONTROL_PORT, flower_env, split_address, write_flwr_config
from fedvision.runtime.simulation import APP_DIR

# How long an interrupted launcher waits for the ServerApp to confirm that it stopped (it polls
# every 50 ms, but a round's replies may still be arriving).
INTERRUPT_WAIT_S = 60.0


def follow_rounds(run_dir: Path, stop: threading.Event) -> None:
    """A progress line from the run directory's metrics, as the ServerApp writes them.

    The ServerApp runs in another process (beside the SuperLink); its metrics file is what it
    reports through, so the submitting side shows progress from there.
    """
    cfg = load_run_config(run_dir)
    bar = tqdm(
        total=int(cfg["num_rounds"]), desc="rounds", unit="round", dynamic_ncols=True,
        disable=not cfg.get("progress", True),
    )  # fmt: skip
    seen = 0
    told = len(read_node_events(run_dir))  # a resume's earlier events were told before
    while not stop.wait(0.5):
        try:
            records = read_metrics(run_dir)
            events = read_node_events(run_dir)
        except ValueError:  # a line being written: read it next time
            continue
        for event in events[told:]:  # the ServerApp's own lines stay remote
            if (line := describe_node_event(event)) is not None:
                tqdm.write(line, file=sys.stderr)
        told = len(events)
        for r in records[1:]:
            if int(r["round"]) > seen:
                bar.n = seen = int(r["round"])
                for f in r.get("failures", []):  # the ServerApp's own warning stays remote
                    tqdm.write(
                        f"fedvision: round {seen}: client {f['partition']} failed: {f['reason']}",
                        file=sys.stderr,
                    )
                bar.set_postfix(test=r.get("test_accuracy"), failed=r.get("num_failures", 0))
        bar.refresh()
    bar.close()


class DeploymentRuntime:
    """A federation of real SuperNodes behind a SuperLink, reached over its Control API.

    Parameters
    ----------
    server : the Control API, ``HOST:8000`` (``fedvision server --host/--port``).
    root_certificates : the federation's ca.pem; None with ``insecure``.
    insecure : talk to a server started with ``--insecure``.
    client_device : the device of clients whose node config names none.
    connect_timeout_s, round_timeout_s : read by the server (waiting for clients, for replies).
    """

    name = "deployment"
    shares_run_dir = False

    def __init__(
        self,
        server: str = f"127.0.0.1:{CONTROL_PORT}",
        root_certificates: str | None = None,
        insecure: bool = False,
        client_device: str = "auto",
        connect_timeout_s: float = 300,
        round_timeout_s: float = 3600,
    ) -> None:
        self.server = str(server)
        self.root_certificates = None if root_certificates is None else Path(root_certificates)
        self.insecure = bool(insecure)
        self.device = str(client_device)
        self.connect_timeout_s = float(connect_timeout_s)
        self.round_timeout_s = float(round_timeout_s)

    def check(self) -> None:
        """Refuse settings that cannot reach the server (before any data work)."""
        split_address(self.server, CONTROL_PORT)
        if self.connect_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise FedvisionError("runtime.connect_timeout_s and round_timeout_s must be > 0")
        if not self.insecure:
            if self.root_certificates is None:
                raise FedvisionError(
                    "runtime=deployment needs runtime.root_certificates=/path/to/ca.pem (the "
                    "federation's CA), or runtime.insecure=true for a server started --insecure"
                )
            if not self.root_certificates.is_file():
                raise FedvisionError(f"runtime.root_certificates={self.root_certificates}: no file")
        if not (APP_DIR / "pyproject.toml").is_file():
            raise FedvisionError(
                f"runtime=deployment submits the app folder {APP_DIR}, which has no "
                "pyproject.toml: install fedvision from a clone (pip install -e .)"
            )

    def start(self, *, verbose: bool = False) -> None:
        """Nothing starts here: the federation is already running."""

    def stop(self) -> None:
        """Nothing to stop (the server and clients run on)."""

    def client_device(self) -> str:
        """The device of clients whose node config names none."""
        return self.device

    def launch(self, run_dir: Path, num_clients: int, *, verbose: bool = False) -> None:
        """Submit the run with ``flwr run --stream`` and wait until the ServerApp ends."""
        with tempfile.TemporaryDirectory(prefix="fedvision-flwr-") as home:
            write_flwr_config(
                Path(home), self.server, None if self.insecure else self.root_certificates
            )
            cmd = ["flwr", "run", str(APP_DIR), "fedvision", "--stream", "--run-config",
                   f"{C.RUN_DIR_KEY}='{run_dir.resolve()}'"]  # fmt: skip
            stop = threading.Event()
            follower = threading.Thread(target=follow_rounds, args=(run_dir, stop), daemon=True)
            follower.start()
            try:
                done = subprocess.run(
                    cmd,
                    env=flower_env({"FLWR_HOME": home}),
                    stdout=None if verbose else subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            finally:
                stop.set()
                follower.join(timeout=5)
        status = read_status(run_dir)
        # Ctrl-C reaches `flwr run` too, which leaves at once; the ServerApp beside the
        # SuperLink sees the interrupt request at its next poll and then writes its status.
        deadline = time.monotonic() + INTERRUPT_WAIT_S
        while (
            status is None and (run_dir / C.RUN_INTERRUPT).exists() and time.monotonic() < deadline
        ):
            time.sleep(0.2)
            status = read_status(run_dir)
        if status is None or status.get("status") not in ("finished", "failed", "interrupted"):
            tail = (done.stdout or "").strip().splitlines()[-3:]
            raise FedvisionError(
                f"the federation at {self.server} did not run {run_dir} (flwr run exit "
                f"{done.returncode}): {' | '.join(tail) or 'no output'}; is `fedvision server` "
                "running there, with the same TLS setting?"
            )
