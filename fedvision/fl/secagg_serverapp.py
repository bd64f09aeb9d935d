"""The SecAgg+ ServerApp (``fedvision.fl.secagg_serverapp:app``), chosen by ``secagg=secaggplus``.

Like ``fedvision.fl.serverapp``, it finds its experiment through the Flower run config
(``run-dir``) and reports only through files there; the rounds are Flower's legacy
``DefaultWorkflow`` with ``SecAggPlusWorkflow`` (``fedvision.fl.secagg``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvision.fl.secagg import serve_secagg
from fedvision.fl.server import serve
from fedvision.rundir import run_dir_from

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds of the run directory named in the run config, securely aggregated."""

    def loop(grid: Grid, run_dir: Path, cfg: dict[str, Any], started: float) -> dict[str, Any]:
        return serve_secagg(grid, run_dir, cfg, started, context=context)

    serve(grid, run_dir_from(context.run_config), loop=loop)
