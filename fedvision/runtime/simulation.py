"""Run a ServerApp/ClientApp pair in Flower's Simulation Engine on Ray.

Every Flower runtime call lives in ``fedvision/runtime`` so a Flower upgrade touches one folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedvision.errors import FedvisionError

# Flower must not phone home or install anything at run time (offline clusters, CI).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's own future default; setting it silences a warning on every start.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def backend_config(runtime: Mapping[str, Any], *, verbose: bool = False) -> dict[str, Any]:
    """Translate the ``runtime`` config group into Flower's Ray ``backend_config``."""
    cpus = float(runtime.get("num_cpus_per_client", 1))
    gpus = float(runtime.get("num_gpus_per_client", 0.0))
    if cpus <= 0:
        raise FedvisionError(f"runtime.num_cpus_per_client={cpus} must be > 0")
    if gpus < 0:
        raise FedvisionError(f"runtime.num_gpus_per_client={gpus} must be >= 0")
    address = runtime.get("ray_address")
    if gpus > 0 and address is None:
        import torch

        if not torch.cuda.is_available():
            # Ray would wait forever for a GPU that is not there.
            raise FedvisionError(
                f"runtime.num_gpus_per_client={gpus} but this machine has no CUDA GPU; "
                "set runtime.num_gpus_per_client=0"
            )
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(verbose)}
    if address is not None:
        init_args["address"] = str(address)
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": init_args,
    }


def run_in_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    runtime: Mapping[str, Any],
    *,
    verbose: bool = False,
) -> None:
    """Run the apps with ``num_clients`` simulated SuperNodes; Ray is shut down afterwards."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    config = backend_config(runtime, verbose=verbose)
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)  # the progress line says what matters
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=config,
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)
        import ray

        if ray.is_initialized():  # Flower shuts Ray down on success; make sure on failure too
            ray.shutdown()
