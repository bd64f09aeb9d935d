"""The run directory's metrics: one JSON line per round, a summary, and the curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedvision import constants as C
from fedvision.atomic import write_json_atomic, write_text_atomic
from fedvision.report.plots import plot_curves


def read_metrics(run_dir: Path) -> list[dict]:
    """Read ``metrics.jsonl`` of a run directory (empty list when there is none)."""
    path = run_dir / C.RUN_METRICS
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


class RunRecorder:
    """Owns a run's metrics file: appends round records, keeps best-so-far, writes the summary.

    Parameters
    ----------
    run_dir : the run directory.
    history : records of rounds already done (when resuming); the file is rewritten to hold
        exactly these, so rounds after the checkpoint that resumed are not counted twice.
    """

    def __init__(self, run_dir: Path, history: Sequence[dict] = ()) -> None:
        self.run_dir = run_dir
        self.records: list[dict] = list(history)
        self.path = run_dir / C.RUN_METRICS
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    @property
    def best(self) -> tuple[float | None, int | None]:
        """Best test accuracy so far and its round (``(None, None)`` before any evaluation)."""
        evaluated = [r for r in self.records if r.get("accuracy") is not None]
        if not evaluated:
            return None, None
        top = max(evaluated, key=lambda r: (r["accuracy"], -r["round"]))
        return top["accuracy"], top["round"]

    def append(self, record: dict) -> None:
        """Append one round's record and flush it to disk at once."""
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def finish(self, *, num_rounds: int, wall_s: float, extra: dict | None = None) -> dict:
        """Write ``summary.json`` and ``curves.png``; return the summary."""
        evaluated = [r for r in self.records if r.get("accuracy") is not None]
        best_acc, best_round = self.best
        summary = {
            "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
            "final_loss": evaluated[-1]["loss"] if evaluated else None,
            "best_accuracy": best_acc,
            "best_round": best_round,
            "num_rounds": num_rounds,
            "rounds_done": max((r["round"] for r in self.records), default=0),
            "wall_s": round(wall_s, 2),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.records),
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.records),
            **(extra or {}),
        }
        write_json_atomic(self.run_dir / C.RUN_SUMMARY, summary)
        plot_curves(self.records, self.run_dir / C.RUN_CURVES, title=str(self.run_dir.name))
        return summary
