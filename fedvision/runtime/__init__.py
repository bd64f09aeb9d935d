"""Runtimes: where the ServerApp and ClientApps of a prepared run directory run."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Runtime(Protocol):
    """What ``fedvision run`` needs of a runtime (``conf/runtime/*.yaml`` names one by _target_).

    ``check`` refuses impossible settings before any data work; ``start`` may begin work that
    overlaps the data preparation (Ray); ``launch`` runs the apps on the run directory; ``stop``
    releases whatever ``start`` began, also after a failure.
    """

    name: str
    connect_timeout_s: float  # the server waits this long for every client (run.json)
    round_timeout_s: float  # and this long for a round's replies
    # Every client sees the run directory (one machine, or a cluster's shared filesystem): the
    # clients' state between rounds is kept there (fedvision.fl.client_state) and survives a resume.
    shares_run_dir: bool

    def check(self) -> None: ...

    def start(self, *, verbose: bool = False) -> None: ...

    def client_device(self) -> str: ...

    def launch(self, run_dir: Path, num_clients: int, *, verbose: bool = False) -> None: ...

    def stop(self) -> None: ...
