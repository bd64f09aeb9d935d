"""The run directory's metrics file, summary and curves."""

from __future__ import annotations

import json

from fedvision import constants as C
from fedvision.report.metrics import RunRecorder, read_metrics


def _round(r: int, val: float | None, test: float | None, **extra) -> dict:
    return {"round": r, "val_accuracy": val, "test_accuracy": test, "test_loss": 1.0, **extra}


def test_recorder_appends_summarises_and_truncates_on_resume(tmp_path):
    rec = RunRecorder(tmp_path, select_on="val_accuracy")
    rec.append(_round(0, 0.1, 0.1, train_loss=None))
    rec.append(_round(1, 0.5, 0.45, train_loss=1.5, bytes_up=10))
    rec.append(_round(2, 0.4, 0.42, train_loss=1.1, bytes_up=5))
    assert rec.best_with() == (1, 0.5)
    summary = rec.finish(num_rounds=3, wall_s=1.234)
    assert summary["test_accuracy_final"] == 0.42 and summary["best_round"] == 1
    assert summary["test_accuracy_at_best_val"] == 0.45 and summary["val_accuracy_best"] == 0.5
    assert summary["bytes_up"] == 15 and summary["rounds_done"] == 2
    assert json.loads((tmp_path / C.RUN_SUMMARY).read_text())["selection"] == "val_accuracy"
    png = (tmp_path / C.RUN_CURVES).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Resuming from the round-1 checkpoint keeps rounds 0-1 and forgets round 2.
    RunRecorder(tmp_path, [r for r in read_metrics(tmp_path) if r["round"] <= 1])
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]


def test_best_round_is_chosen_on_validation_never_on_test(tmp_path):
    rec = RunRecorder(tmp_path, select_on="val_accuracy")
    rec.append(_round(1, 0.60, 0.30))
    rec.append(_round(2, 0.50, 0.90))  # the best test accuracy must not pick this round
    assert rec.best_with() == (1, 0.60)
    assert rec.best_with(_round(3, 0.61, 0.1)) == (3, 0.61)  # a candidate record counts too
    assert rec.best_with(_round(3, 0.60, 0.1)) == (1, 0.60)  # ties keep the earlier round
    summary = rec.finish(num_rounds=2, wall_s=0.0)
    assert (summary["best_round"], summary["test_accuracy_at_best_val"]) == (1, 0.30)


def test_without_validation_data_no_round_is_called_best(tmp_path):
    rec = RunRecorder(tmp_path, select_on=None)
    rec.append(_round(1, None, 0.9))
    summary = rec.finish(num_rounds=1, wall_s=0.0)
    assert summary["best_round"] is None and summary["test_accuracy_at_best_val"] is None
    assert summary["test_accuracy_final"] == 0.9
