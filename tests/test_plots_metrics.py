"""The run directory's metrics file, summary and curves."""

from __future__ import annotations

import json

from fedvision import constants as C
from fedvision.report.metrics import RunRecorder, read_metrics


def test_recorder_appends_summarises_and_truncates_on_resume(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.append({"round": 0, "accuracy": 0.1, "loss": 2.3, "train_loss": None})
    rec.append({"round": 1, "accuracy": 0.5, "loss": 1.2, "train_loss": 1.5, "bytes_up": 10})
    rec.append({"round": 2, "accuracy": 0.4, "loss": 1.3, "train_loss": 1.1, "bytes_up": 5})
    assert rec.best == (0.5, 1)
    summary = rec.finish(num_rounds=3, wall_s=1.234)
    assert summary["final_accuracy"] == 0.4 and summary["best_round"] == 1
    assert summary["bytes_up"] == 15 and summary["rounds_done"] == 2
    assert json.loads((tmp_path / C.RUN_SUMMARY).read_text())["best_accuracy"] == 0.5
    png = (tmp_path / C.RUN_CURVES).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Resuming from the round-1 checkpoint keeps rounds 0-1 and forgets round 2.
    RunRecorder(tmp_path, [r for r in read_metrics(tmp_path) if r["round"] <= 1])
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]
