"""The run directory's metrics: one JSON line per round, a summary, and the curves."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedvision import constants as C
from fedvision.atomic import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from fedvision.report.plots import plot_curves
from fedvision.report.tracking import NoTracker, Tracker


def read_metrics(run_dir: Path) -> list[dict]:
    """Read ``metrics.jsonl`` of a run directory (empty list when there is none).

    A torn last line (a crash inside an append) is dropped with a warning: on resume the
    checkpoint, not the file, says which rounds are done.
    """
    return read_jsonl(run_dir / C.RUN_METRICS)


class RunRecorder:
    """Owns a run's metrics file: appends round records, tracks the best round, writes the summary.

    The best round is chosen on validation data (``select_on``: the server's held-out part,
    ``val_accuracy``, or the clients' federated validation, ``client_val_accuracy``), never on
    the test split, which is only reported.

    Parameters
    ----------
    run_dir : the run directory.
    history : records of rounds already done (when resuming); the file is rewritten to hold
        exactly these, so rounds after the checkpoint that resumed are not counted twice.
    select_on : the record key that picks the best round, or None (no validation data).
    tracker : where each record is mirrored too (TensorBoard, W&B, MLflow); closed by ``finish``.
    """

    def __init__(
        self,
        run_dir: Path,
        history: Sequence[dict] = (),
        *,
        select_on: str | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.select_on = select_on
        self.tracker = tracker or NoTracker()
        self.tracker_error: str | None = None  # why the tracker was switched off, if it was
        self.records: list[dict] = list(history)
        self.path = run_dir / C.RUN_METRICS
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def best_with(self, record: dict | None = None) -> tuple[int | None, float | None]:
        """Best round and its validation value over the records (plus ``record``, if given).

        Ties go to the earlier round; ``(None, None)`` without validation data.
        """
        key = self.select_on
        if key is None:
            return None, None
        rows = [*self.records, *([record] if record is not None else [])]
        scored = [r for r in rows if r.get(key) is not None]
        if not scored:
            return None, None
        top = max(scored, key=lambda r: (r[key], -r["round"]))
        return int(top["round"]), float(top[key])

    def append(self, record: dict) -> None:
        """Append one round's record: one whole line, on disk before the next round."""
        self.records.append(record)
        append_jsonl(self.path, record)
        self._mirror(lambda: self.tracker.log(record, int(record["round"])))

    def _mirror(self, call: Callable[[], None]) -> None:
        # A tracker is a mirror of metrics.jsonl: if it fails (a full disk, a locked database, a
        # lost connection), say so once and go on without it rather than lose the run.
        try:
            call()
        except Exception as exc:  # any tracker error, from any library
            print(
                f"fedvision: warning: the experiment tracker failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "metrics.jsonl goes on, the tracker is switched off for this run",
                file=sys.stderr,
            )
            self.tracker = NoTracker()
            self.tracker_error = f"{type(exc).__name__}: {exc}"

    def finish(self, *, num_rounds: int, wall_s: float, extra: dict | None = None) -> dict:
        """Write ``summary.json`` and ``curves.png``; return the summary.

        Every figure names its split: ``test_*`` (reported only), ``val_*`` (used to select).
        """
        tested = [r for r in self.records if r.get("test_accuracy") is not None]
        best_round, best_value = self.best_with()
        at_best = next((r for r in self.records if r["round"] == best_round), {})
        summary = {
            "test_accuracy_final": tested[-1]["test_accuracy"] if tested else None,
            "test_loss_final": tested[-1]["test_loss"] if tested else None,
            "selection": self.select_on,
            "best_round": best_round,
            "val_accuracy_best": best_value,
            "test_accuracy_at_best_val": at_best.get("test_accuracy"),
            "num_rounds": num_rounds,
            "rounds_done": max((r["round"] for r in self.records), default=0),
            "wall_s": round(wall_s, 2),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.records),
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.records),
            **(extra or {}),
        }
        self._mirror(self.tracker.close)
        if self.tracker_error is not None:
            summary["tracking_error"] = self.tracker_error
        write_json_atomic(self.run_dir / C.RUN_SUMMARY, summary)
        plot_curves(self.records, self.run_dir / C.RUN_CURVES, title=str(self.run_dir.name))
        return summary
