"""Flower ServerApp built around a prepared ``ServerPlan``."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvision.fl.server import ServerPlan, build_strategy, run_federation


class RunOutcome:
    """What the ServerApp leaves for its caller: the summary, or the exception that stopped it.

    Flower runs the ServerApp in a thread of its own and turns any exception into a generic
    RuntimeError; keeping the original lets the CLI print the real one-line cause.
    """

    def __init__(self) -> None:
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None


def make_server_app(plan: ServerPlan, outcome: RunOutcome) -> ServerApp:
    """Build a ServerApp that runs ``plan`` and records its result in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            strategy = build_strategy(plan.cfg["strategy"])
            outcome.summary = run_federation(grid, strategy, plan)
        except BaseException as exc:
            outcome.error = exc
            raise

    return app
