"""The server side of a run: its status around the round loop (:mod:`fedvision.fl.loop`).

:func:`serve` loads the run directory's config, runs the rounds and writes ``status.json``
whatever happens (finished, failed with its one-line reason, or interrupted).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedvision.errors import FedvisionError
from fedvision.fl.directory import InterruptibleGrid
from fedvision.fl.loop import run_rounds
from fedvision.fl.pulls import object_pulls_for
from fedvision.report.metrics import read_metrics
from fedvision.rundir import RunInterrupted, RunSuperseded, load_run_config, write_status


def serve(grid: Grid, run_dir: Path) -> dict[str, Any]:
    """Run a prepared run directory's rounds on ``grid``; write its results there.

    Writes ``status.json`` (finished, failed with the one-line reason, or interrupted: the
    launcher got a signal and wrote ``C.RUN_INTERRUPT``) whatever happens."""
    started = time.time()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    try:
        cfg = load_run_config(run_dir)
        if not cfg.get("verbose", False):
            # Flower's per-round INFO lines would break the progress line; warnings still show.
            flwr_logger.setLevel(logging.WARNING)
        with object_pulls_for(grid):
            summary = run_rounds(InterruptibleGrid(grid, run_dir), run_dir, cfg, started)
    except RunSuperseded:  # the newer server owns status.json and everything else now
        return {}
    except RunInterrupted:
        done = max((int(r["round"]) for r in read_metrics(run_dir)), default=0)
        write_status(run_dir, "interrupted", f"stopped by a signal after round {done}", round=done)
        return {}
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        write_status(
            run_dir, "failed", reason, user_error=isinstance(exc, FedvisionError),
            type=type(exc).__name__,
        )  # fmt: skip
        raise
    finally:
        flwr_logger.setLevel(level)
    write_status(run_dir, "finished")
    return summary
