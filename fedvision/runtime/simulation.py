"""Run the module-level ServerApp/ClientApp in Flower's Simulation Engine on Ray.

Every Flower runtime call lives in ``fedvision/runtime`` so a Flower upgrade touches one folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedvision import constants as C
from fedvision.errors import FedvisionError

if TYPE_CHECKING:  # flwr is imported where it runs: `fedvision --help` stays light
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

# Flower must not phone home or install anything at run time (offline clusters, CI).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's own future default; set so that the value is the same on every machine. With it Ray
    # leaves CUDA_VISIBLE_DEVICES alone for a worker with no GPU share, so fedvision puts such
    # clients on the CPU itself (client_device below).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
# The folder with the pyproject.toml whose [tool.flwr.app] table declares the apps and the
# run-config keys (the same one `flwr run .` reads).
APP_DIR = Path(__file__).resolve().parents[2]
# How often the engine looks for messages with few nodes. Flower 1.39 looks every 0.1 s
# (vce_api.add_messages_to_queue): 50 ms of mean wait before a round's workers start, a seventh
# of a 0.35 s cross-device cohort round (scripts/bench_cross_device.py), and twice a round for
# each message of a per-client run. A look asks the state once per node, so the wait grows with
# the nodes to keep the asks at PICKUP_ASKS_PER_S; from 40 nodes on it is Flower's own 0.1 s.
COHORT_PICKUP_S = 0.005
PICKUP_ASKS_PER_S = 400
FLOWER_PICKUP_S = 0.1


def set_offline_env() -> None:
    """Turn off Flower's telemetry, update checks and dependency installs (unless set already)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def import_client_app() -> None:
    """Import the ClientApp and what it needs (torch, torchvision, fedvision) in a Ray worker."""
    import fedvision.fl.clientapp  # noqa: F401


def pickup_wait(num_nodes: int) -> float | None:
    """The engine's wait between looks for ``num_nodes`` simulated nodes; None: Flower's own."""
    wait = max(COHORT_PICKUP_S, num_nodes / PICKUP_ASKS_PER_S)
    return wait if wait < FLOWER_PICKUP_S else None


@contextlib.contextmanager
def prompt_pickup(wait_s: float) -> Iterator[None]:
    """While inside, the simulation engine looks for new messages every ``wait_s`` seconds.

    The engine starts ``vce_api.add_messages_to_queue`` as its extractor thread by name, with no
    setting for its wait; this puts Flower's loop with another wait in its place and the
    original back on the way out (as :func:`~fedvision.runtime.ray_backend.tolerant_backend`).
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def pickup(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(wait_s)

    vce_api.add_messages_to_queue = pickup
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


class PlacedClientApp:
    """The run's ClientApp, recording where each train message ran in ``nodes.jsonl``.

    On a Ray cluster the simulated clients of one run train on several machines; the server
    sees Flower node ids only. Each train reply adds a ``ran`` event with the Ray node, host and
    process that served it, written by the Ray worker into the run directory (which a cluster
    shares). The event keeps ``node`` and ``partition``, so readers of the file that look for
    ``holds`` and ``refused`` are not affected.
    """

    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def __call__(self, message: Message, context: Context) -> Message:
        """Run the app on ``message``; record where it ran when it was a train message."""
        import ray
        from flwr.app.message_type import MessageType

        from fedvision.rundir import append_node_event, run_dir_from

        reply = self.app(message=message, context=context)
        if message.metadata.message_type == MessageType.TRAIN:
            configs = message.content.config_records.values()  # Flower's strategies: server-round
            append_node_event(
                run_dir_from(context.run_config),
                {
                    "event": "ran",
                    "node": int(context.node_id),
                    "partition": int(context.node_config["partition-id"]),
                    "round": next(
                        (int(c["server-round"]) for c in configs if "server-round" in c), None
                    ),
                    "ok": not reply.has_error(),
                    "ray_node": ray.get_runtime_context().get_node_id(),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "time": round(time.time(), 3),
                },
            )
        return reply


class SimulationRuntime:
    """Flower's Simulation Engine on Ray: many clients share this machine (or a Ray cluster).

    Parameters
    ----------
    num_cpus_per_client, num_gpus_per_client : Ray resources of one client (0.25 GPUs: four
        clients share a GPU). Clients with no GPU share train on the CPU.
    ray_address : None starts a local Ray; ``auto`` or ``HOST:6379`` joins a running cluster.
    connect_timeout_s, round_timeout_s : read by the server (waiting for clients, for replies).
    cohort_workers : 0 simulates one SuperNode per partition; N > 0 simulates N worker nodes
        that each train a share of every round's clients back to back (``fedvision.fl.cohort``).
    """

    name = "simulation"
    shares_run_dir = True

    def __init__(
        self,
        num_cpus_per_client: float = 1,
        num_gpus_per_client: float = 0.0,
        ray_address: str | None = None,
        connect_timeout_s: float = 120,
        round_timeout_s: float = 3600,
        cohort_workers: int = 0,
    ) -> None:
        self.num_cpus = float(num_cpus_per_client)
        self.cohort_workers = int(cohort_workers)
        self.num_gpus = float(num_gpus_per_client)
        self.ray_address = ray_address
        self.connect_timeout_s = float(connect_timeout_s)
        self.round_timeout_s = float(round_timeout_s)

    def check(self) -> None:
        """Refuse settings that cannot work, before any data work."""
        if self.num_cpus <= 0:
            raise FedvisionError(f"runtime.num_cpus_per_client={self.num_cpus} must be > 0")
        if self.num_gpus < 0:
            raise FedvisionError(f"runtime.num_gpus_per_client={self.num_gpus} must be >= 0")
        if self.cohort_workers < 0:
            raise FedvisionError(
                f"runtime.cohort_workers={self.cohort_workers} must be >= 0 (0: a node per client)"
            )
        if self.connect_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise FedvisionError("runtime.connect_timeout_s and round_timeout_s must be > 0")
        if self.num_gpus > 0 and self.ray_address is None:
            import torch

            if not torch.cuda.is_available():
                # Ray would wait forever for a GPU that is not there.
                raise FedvisionError(
                    f"runtime.num_gpus_per_client={self.num_gpus} but this machine has no CUDA "
                    "GPU; set runtime.num_gpus_per_client=0"
                )

    def client_device(self) -> str:
        """The device simulated clients train on: the GPU share Ray gives them, else the CPU."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def start(self, *, verbose: bool = False) -> None:
        """Start Ray now, and warm its workers, before the launcher prepares the data.

        Flower starts Ray only after the ServerApp began, and then each client actor imports
        torch, torchvision and fedvision on its first message: 15.5 s from data ready to round 1
        with 2 clients on 2 cores (scripts/bench_sim.py). Started here, with a setup hook that
        imports the ClientApp in every worker process as it starts, Ray's pre-started workers
        import during the data work and the round-0 evaluation, and Flower's actors reuse them
        (10.3 s). Flower skips its own ``ray.init`` when Ray is running.
        """
        import ray

        set_offline_env()
        if ray.is_initialized():
            return
        ray.init(
            **self.backend_config(verbose=verbose)["init_args"],
            runtime_env={
                # Every worker imports the ClientApp as it starts, before an actor asks for it.
                "worker_process_setup_hook": f"{__name__}.import_client_app",
                # Ray sets this for an actor only when it is created; torch, imported earlier
                # by the hook, must see the client's share already (or it oversubscribes).
                "env_vars": {"OMP_NUM_THREADS": str(max(1, int(self.num_cpus)))},
            },
        )

    def stop(self) -> None:
        """Shut Ray down (whatever started it)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def backend_config(self, *, verbose: bool = False) -> dict[str, Any]:
        """Flower's Ray ``backend_config`` for these settings."""
        init_args: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": bool(verbose),
            "logging_level": logging.INFO if verbose else logging.WARNING,
        }
        if self.ray_address is not None:
            init_args["address"] = str(self.ray_address)
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init_args,
        }

    def launch(self, run_dir: Path, num_clients: int, *, verbose: bool = False) -> None:
        """Simulate ``num_clients`` SuperNodes (or the cohort workers) running the apps on
        ``run_dir``; Ray stops after.

        This mirrors what ``flwr run`` does with a local simulation (the ``flwr-simulation``
        process): the run config, fused from ``[tool.flwr.app.config]`` and ``run-dir``, reaches
        the ServerApp and every ClientApp. Flower 1.39's public ``run_simulation`` cannot pass a
        run config, hence its private twin, kept to this one call.
        """
        self.start(verbose=verbose)
        from flwr.app import Context, RecordDict
        from flwr.common.config import get_fused_config_from_dir
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.constant import NOOP_FEDERATION_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supercore.telemetry import EventType

        from fedvision.rundir import load_app, read_plan
        from fedvision.runtime.ray_backend import tolerant_backend

        # The run plan names the app pair (SecAgg+ and cohort workers have their own ClientApp).
        plan = read_plan(run_dir)
        server_app, client_app = (
            load_app(plan.server_app),
            PlacedClientApp(load_app(plan.client_app)),
        )

        run = Run.create_empty(run_id=secrets.randbits(63))
        run.override_config = {C.RUN_DIR_KEY: str(run_dir.resolve())}
        run.primary_task_id = secrets.randbits(63)
        run.federation_id = NOOP_FEDERATION_ID
        # What _run_simulation does for a run it creates itself (messages carry this identity).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        context = Context(
            run_id=run.run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=get_fused_config_from_dir(APP_DIR, run.override_config),
        )
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        if not verbose:
            flwr_logger.setLevel(logging.ERROR)  # the progress line says what matters
        try:
            # A lost Ray node costs the clients it was running, not later rounds.
            wait = pickup_wait(self.cohort_workers or num_clients)
            pickup = contextlib.nullcontext() if wait is None else prompt_pickup(wait)
            with tolerant_backend(), pickup:
                _run_simulation(
                    num_supernodes=self.cohort_workers or num_clients,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app,
                    server_app=server_app,
                    backend_config=self.backend_config(verbose=verbose),
                    server_app_context=context,
                    app_dir=str(APP_DIR),
                    run=run,
                    is_app=True,
                    verbose_logging=verbose,
                )
        finally:
            flwr_logger.setLevel(level)
            self.stop()  # Flower shuts Ray down on success; make sure on failure too
