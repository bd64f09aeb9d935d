"""Experiment trackers (TensorBoard by default) and sweeps that survive a failed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.report.metrics import RunRecorder, read_metrics
from fedvision.report.tracking import TensorBoardTracker, build_tracker, check_tracking, scalars


def _scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_recorder_mirrors_new_rounds_into_tensorboard(tmp_path):
    cfg = {"seed": 3, "tracking": {"kind": "tensorboard", "subdir": "tb"}}
    history = [{"round": 0, "test_accuracy": 0.1}]  # a resumed run's earlier rounds: logged then
    tracker = build_tracker(cfg, tmp_path)
    assert isinstance(tracker, TensorBoardTracker)
    recorder = RunRecorder(tmp_path, history, select_on=None, tracker=tracker)
    recorder.append({"round": 1, "test_accuracy": 0.25, "clients": [0, 2], "lr": 0.01})
    recorder.append(
        {"round": 2, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": None, "lr": 0.005}
    )
    recorder.finish(num_rounds=2, wall_s=1.0)
    got = _scalars(tmp_path / "tb")
    assert got["test_accuracy"] == [(1, 0.25), (2, 0.5)]
    assert [v for _, v in got["lr"]] == pytest.approx([0.01, 0.005])
    assert "clients" not in got and "train_loss" not in got  # lists and None are not scalars


def test_scalars_keep_numbers_only():
    assert scalars({"round": 1, "a": 1, "b": 0.5, "c": True, "d": "x", "e": None, "f": [1]}) == {
        "a": 1.0,
        "b": 0.5,
    }


def test_a_tracker_whose_package_is_missing_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(FedvisionError, match="tracking=wandb needs the wandb package"):
        check_tracking({"tracking": {"kind": "wandb"}})
    with pytest.raises(FedvisionError, match=r"tracking\.kind='comet' is not one of"):
        check_tracking({"tracking": {"kind": "comet"}})


def test_a_sweep_records_a_failed_run_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "FEDVISION_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "fedvision.cli", "run", "-m", "num_rounds=-1,0",
         f"hydra.sweep.dir={sweep}", "progress=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the sweep ran both, then said that runs failed
    jobs = json.loads((sweep / C.SWEEP_SUMMARY).read_text())["jobs"]
    assert [(j["dir"], j["status"]) for j in jobs] == [("0", "failed"), ("1", "failed")]
    assert jobs[1]["error"] == "num_rounds=0 must be >= 1"  # the second job ran after the first
    for job, rounds in (("0", -1), ("1", 0)):
        assert yaml.safe_load((sweep / job / C.RUN_CONFIG).read_text())["num_rounds"] == rounds
    assert "0 of 2 runs finished" in proc.stderr
    report = subprocess.run(
        [sys.executable, "-m", "fedvision.cli", "report", str(sweep), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "failed (num_rounds=-1 must be >= 1)" in report.stdout


class _FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def test_the_wandb_tracker_runs_offline_named_by_directory_and_grouped_by_sweep(
    tmp_path, monkeypatch
):
    # wandb is an optional package (not installed here): a stand-in records what is called.
    import types

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or _FakeWandbRun(calls)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "sweep" / "3"
    run_dir.mkdir(parents=True)
    cfg = {"seed": 1, "partition": {"alpha": 0.1}, "tracking": {"kind": "wandb"}}
    tracker = build_tracker(cfg, run_dir)
    tracker.log({"round": 2, "test_accuracy": 0.5, "clients": [1]}, 2)
    tracker.close()
    (_, init), log, finish = calls
    assert init["mode"] == "offline" and init["project"] == "fedvision"
    assert (init["name"], init["group"]) == ("3", "sweep")
    assert init["config"]["partition.alpha"] == 0.1
    assert log == ("log", {"test_accuracy": 0.5}, 2) and finish == ("finish",)


def test_the_mlflow_tracker_logs_params_and_metrics_to_a_sweep_database(tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)),
        set_experiment=lambda name: calls.append(("experiment", name)),
        start_run=lambda **kw: calls.append(("start", kw)),
        log_params=lambda p: calls.append(("params", p)),
        log_metrics=lambda m, step: calls.append(("metrics", m, step)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    cfg = {"seed": 0, "tracking": {"kind": "mlflow", "uri": None, "experiment": "fv"}}
    tracker = build_tracker(cfg, run_dir)
    tracker.log({"round": 1, "val_accuracy": 0.25}, 1)
    tracker.close()
    # MLflow 3 refuses the old ./mlruns file store: a SQLite file per sweep, absolute path.
    assert calls[0] == ("uri", f"sqlite:///{(tmp_path / 'sweep' / 'mlflow.db').resolve()}")
    assert calls[0][1].startswith("sqlite:////")
    assert calls[1] == ("experiment", "fv")
    assert calls[2] == ("start", {"run_name": "0", "tags": {"sweep": "sweep"}})
    assert calls[3][0] == "params" and calls[3][1]["seed"] == "0"
    assert calls[4:] == [("metrics", {"val_accuracy": 0.25}, 1), ("end",)]


def test_a_prepared_sweep_is_no_failure_and_a_cut_short_run_is(tmp_path):
    from omegaconf import OmegaConf

    from fedvision.rundir import write_status
    from fedvision.runner import SweepSummary

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / C.RUN_CONFIG).write_text("seed: 0\n")
    (sweep / "0" / C.RUN_PLAN).write_text("{}")  # runtime=prepare_only: ready for `flwr run`
    write_status(sweep / "1", "finished")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepSummary().on_multirun_end(cfg)  # no SystemExit: nothing failed
    jobs = json.loads((sweep / C.SWEEP_SUMMARY).read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["prepared", "finished"]

    (sweep / "2").mkdir()
    (sweep / "2" / C.RUN_CONFIG).write_text("seed: 1\n")  # neither prepared nor finished
    with pytest.raises(SystemExit) as exited:
        SweepSummary().on_multirun_end(cfg)
    assert exited.value.code == 1
    jobs = json.loads((sweep / C.SWEEP_SUMMARY).read_text())["jobs"]
    assert jobs[2]["status"] == "unfinished"


def test_the_real_mlflow_records_every_round_where_the_ui_reads(tmp_path):
    # Skipped where MLflow is not installed (CI); run by hand with `pip install mlflow-skinny`.
    mlflow = pytest.importorskip("mlflow")
    run_dir = tmp_path / "sweep" / "1"
    run_dir.mkdir(parents=True)
    cfg = {"seed": 1, "partition": {"alpha": 0.1}, "tracking": {"kind": "mlflow", "uri": None,
           "experiment": "fv"}}  # fmt: skip
    recorder = RunRecorder(run_dir, select_on=None, tracker=build_tracker(cfg, run_dir))
    for rnd, acc in ((0, 0.1), (1, 0.3), (2, 0.45)):
        recorder.append({"round": rnd, "test_accuracy": acc, "test_loss": 1.0, "clients": [0]})
    summary = recorder.finish(num_rounds=2, wall_s=1.0)
    assert "tracking_error" not in summary
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fv").experiment_id])
    assert run.info.run_name == "1" and run.data.tags["sweep"] == "sweep"
    assert run.data.params["partition.alpha"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 0.3), (2, 0.45)]


class _BrokenTracker:
    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.logged = fail_at, []

    def log(self, record, step):
        if step == self.fail_at:
            raise OSError("database is locked")
        self.logged.append(step)

    def close(self):
        raise AssertionError("a switched-off tracker is not closed")


def test_a_tracker_that_fails_mid_run_is_switched_off_and_the_run_goes_on(tmp_path, capsys):
    tracker = _BrokenTracker(fail_at=1)
    recorder = RunRecorder(tmp_path, select_on="val_accuracy", tracker=tracker)
    for rnd in range(3):
        recorder.append(
            {"round": rnd, "val_accuracy": 0.1 * rnd, "test_accuracy": 0.2 * rnd, "test_loss": 1.0}
        )
    summary = recorder.finish(num_rounds=2, wall_s=1.0)
    assert tracker.logged == [0]  # round 1 failed; round 2 was not sent to it any more
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]  # nothing lost
    assert summary["test_accuracy_final"] == pytest.approx(0.4)
    assert summary["tracking_error"] == "OSError: database is locked"
    assert json.loads((tmp_path / C.RUN_SUMMARY).read_text())["tracking_error"].startswith(
        "OSError"
    )
    err = capsys.readouterr().err
    assert err.count("experiment tracker failed (OSError: database is locked)") == 1
