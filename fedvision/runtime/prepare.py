"""A runtime that only prepares the run directory, for `flwr run` against any Flower federation."""

from __future__ import annotations

from pathlib import Path

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.runtime.simulation import APP_DIR


class PrepareOnly:
    """Prepare the run directory and stop: for ``flwr run`` against any Flower federation."""

    name = "prepare_only"
    shares_run_dir = False

    def __init__(
        self,
        connect_timeout_s: float = 120,
        round_timeout_s: float = 3600,
        client_device: str = "auto",
    ) -> None:
        # Read by the ServerApp from config.yaml; kept here so that check() sees them too.
        self.connect_timeout_s = float(connect_timeout_s)
        self.round_timeout_s = float(round_timeout_s)
        self.device = str(client_device)

    def check(self) -> None:
        """Refuse timeouts the server could not honour and devices that do not exist."""
        if self.connect_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise FedvisionError("runtime.connect_timeout_s and round_timeout_s must be > 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise FedvisionError(
                f"runtime.client_device={self.device!r}: use auto, cpu, cuda or cuda:N"
            )

    def start(self, *, verbose: bool = False) -> None:
        """Nothing runs here."""

    def stop(self) -> None:
        """Nothing to stop."""

    def client_device(self) -> str:
        """The device of clients whose node config names none (``auto``: CUDA when present)."""
        return self.device

    def launch(self, run_dir: Path, num_clients: int, *, verbose: bool = False) -> None:
        """Print the command that runs the prepared directory."""
        print(
            f"fedvision: prepared {run_dir}; run it with\n"
            f"  flwr run {APP_DIR} <federation> --stream --run-config "
            f"\"{C.RUN_DIR_KEY}='{run_dir.resolve()}'\"\n"
            f"with {num_clients} SuperNodes (a local simulation: --federation-config "
            f'"num-supernodes={num_clients}")'
        )
