"""Flower ServerApp, loadable by name (``fedvision.fl.serverapp:app``) by every runtime.

It finds its experiment through the Flower run config (``run-dir``: a directory that
``fedvision run`` prepared) and reports only through files there, so the Ray simulation that
``fedvision run`` starts and a SuperLink that ``flwr run`` talks to run the very same object.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvision.fl.server import serve
from fedvision.rundir import run_dir_from

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds of the run directory named in the run config."""
    serve(grid, run_dir_from(context.run_config))
