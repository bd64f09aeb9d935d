"""``fedvision report``: grouping, mean ± std over seeds (hand-checked), failed runs left out."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from fedvision import constants as C
from fedvision.cli import main
from fedvision.report.table import rounds_to_target
from fedvision.rundir import write_status


def fake_run(path, *, seed, alpha, accs, best, status="finished", wall=10.0):
    """A run directory as the server leaves it: config, metrics per round, summary, status."""
    path.mkdir(parents=True)
    cfg = {"seed": seed, "progress": False, "partition": {"alpha": alpha, "seed": seed}}
    (path / C.RUN_CONFIG).write_text(yaml.safe_dump(cfg))
    (path / C.RUN_METRICS).write_text(
        "".join(json.dumps({"round": r, "test_accuracy": a}) + "\n" for r, a in enumerate(accs))
    )
    if status == "finished":
        summary = {
            "test_accuracy_final": accs[-1],
            "test_accuracy_at_best_val": best,
            "wall_s": wall,
            "bytes_down": 1e9,
            "bytes_up": 1e9,
        }
        (path / C.RUN_SUMMARY).write_text(json.dumps(summary))
        write_status(path, "finished")
    elif status == "failed":
        write_status(path, "failed", "every client failed")
    # Hydra's own record must not be taken for a run.
    (path / ".hydra").mkdir()
    (path / ".hydra" / C.RUN_CONFIG).write_text(yaml.safe_dump({"seed": 99}))


def test_report_groups_by_settings_and_averages_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", seed=0, alpha=0.5, accs=[0.1, 0.4, 0.6], best=0.6, wall=10)
    fake_run(sweep / "1", seed=1, alpha=0.5, accs=[0.1, 0.5, 0.7], best=0.5, wall=20)
    fake_run(sweep / "2", seed=2, alpha=0.5, accs=[0.1, 0.3, 0.5], best=0.4, wall=30)
    fake_run(sweep / "3", seed=0, alpha=0.1, accs=[0.1, 0.2], best=0.2, wall=5)
    fake_run(sweep / "4", seed=1, alpha=0.1, accs=[0.1], best=None, status="failed")
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--target", "0.5"]) == 0
    rows = {r["group"]: r for r in csv.DictReader((out / C.REPORT_CSV).open())}
    assert set(rows) == {"partition.alpha=0.1", "partition.alpha=0.5"}
    a = rows["partition.alpha=0.5"]
    # Final: (0.6 + 0.7 + 0.5) / 3 = 0.6; sample std sqrt(((0)^2 + 0.1^2 + 0.1^2) / 2) = 0.1.
    assert float(a["test_accuracy_final_mean"]) == pytest.approx(0.6)
    assert float(a["test_accuracy_final_std"]) == pytest.approx(0.1)
    # At best validation: (0.6 + 0.5 + 0.4) / 3 = 0.5, std 0.1.
    assert float(a["test_accuracy_at_best_val_mean"]) == pytest.approx(0.5)
    assert float(a["test_accuracy_at_best_val_std"]) == pytest.approx(0.1)
    # Rounds to 0.5: run 0 -> 2, run 1 -> 1, run 2 -> 2: mean 5/3, all three reached it.
    assert float(a["rounds_to_target_mean"]) == pytest.approx(5 / 3)
    assert int(a["reached_target"]) == 3 and int(a["runs"]) == 3
    assert float(a["wall_s_mean"]) == pytest.approx(20.0)
    assert float(a["bytes_mean"]) == pytest.approx(2e9)
    # The failed run is listed, not averaged: one run in its group.
    b = rows["partition.alpha=0.1"]
    assert (int(b["runs"]), int(b["not_finished"])) == (1, 1)
    assert (
        float(b["test_accuracy_final_mean"]) == pytest.approx(0.2)
        and b["test_accuracy_final_std"] == ""
    )
    text = (out / C.REPORT_MD).read_text()
    assert "0.600 ± 0.100" in text and "failed (every client failed)" in text
    assert (out / C.REPORT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_to_target_is_the_first_round_that_reaches_it():
    records = [{"round": 0, "test_accuracy": 0.1}, {"round": 1}, {"round": 2, "test_accuracy": 0.5}]
    assert rounds_to_target(records, 0.5) == 2 and rounds_to_target(records, 0.6) is None


def test_report_of_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no fedvision run directory" in capsys.readouterr().err


def test_group_names_skip_absent_keys_and_name_targets_by_class():
    from pathlib import Path

    from fedvision.report.table import Run, group_runs

    def run(seed, **settings):
        return Run(Path(f"r{seed}{settings}"), "finished", settings, seed, {}, [], None)

    fedavg = {"strategy._target_": "flwr.serverapp.strategy.FedAvg", "strategy.proximal_mu": None}
    fedprox = {"strategy._target_": "flwr.serverapp.strategy.FedProx", "strategy.proximal_mu": 0.01}
    names = [
        name for name, _ in group_runs([run(0, **fedavg), run(1, **fedavg), run(0, **fedprox)])
    ]
    assert names == ["strategy=FedAvg", "strategy=FedProx, strategy.proximal_mu=0.01"]
    # A part only some runs have (a DP wrapper) is named "none" where it is absent.
    dp = {"privacy.wrapper._target_": "flwr.serverapp.strategy.DifferentialPrivacyServerSide"}
    no_dp = {"privacy.wrapper": None}
    names = [name for name, _ in group_runs([run(0, **dp), run(0, **no_dp), run(1, **no_dp)])]
    assert names == [
        "privacy.wrapper=DifferentialPrivacyServerSide",
        "privacy.wrapper=none",
    ]
    dpsgd = {"privacy.dpsgd.noise_multiplier": 3, "privacy.wrapper": None}
    no_dpsgd = {"privacy.dpsgd": None, "privacy.wrapper": None}
    names = [name for name, _ in group_runs([run(0, **dpsgd), run(0, **no_dpsgd)])]
    assert names == ["privacy.dpsgd.noise_multiplier=3", "privacy.dpsgd=none"]


def _with_partition(path, tv, fingerprint):
    (path / C.PARTITION_SUMMARY).write_text(json.dumps({"mean_tv": tv, "fingerprint": fingerprint}))


def _fake_strategy_run(path, *, seed, alpha, strategy, best):
    fake_run(path, seed=seed, alpha=alpha, accs=[0.1, best], best=best)
    cfg = yaml.safe_load((path / C.RUN_CONFIG).read_text())
    cfg["strategy"] = {"_target_": f"flwr.serverapp.strategy.{strategy}"}
    (path / C.RUN_CONFIG).write_text(yaml.safe_dump(cfg))


def test_report_shows_heterogeneity_groups_by_chosen_keys_and_sorts(tmp_path):
    sweep = tmp_path / "sweep"
    # alpha 0.1: TV 0.6 and 0.8 (mean 0.7, std sqrt(2 * 0.1^2 / 1) = 0.1414); alpha 100: 0.02.
    runs = [
        ("0", 0, 0.1, "FedAvg", 0.30, 0.6, "a"), ("1", 1, 0.1, "FedAvg", 0.40, 0.8, "b"),
        ("2", 0, 0.1, "FedProx", 0.50, 0.6, "a"), ("3", 1, 0.1, "FedProx", 0.60, 0.8, "b"),
        ("4", 0, 100, "FedAvg", 0.70, 0.02, "c"), ("5", 1, 100, "FedAvg", 0.90, 0.02, "d"),
    ]  # fmt: skip
    for name, seed, alpha, strategy, best, tv, fp in runs:
        _fake_strategy_run(sweep / name, seed=seed, alpha=alpha, strategy=strategy, best=best)
        _with_partition(sweep / name, tv, fp)
    out = tmp_path / "rep"
    argv = ["report", str(sweep), "--out", str(out), "--sort-by", "accuracy"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / C.REPORT_CSV).open()))
    # Best first: alpha 100 (0.8), alpha 0.1 FedProx (0.55), alpha 0.1 FedAvg (0.35).
    assert [r["group"] for r in rows] == [
        "partition.alpha=100, strategy=FedAvg",
        "partition.alpha=0.1, strategy=FedProx",
        "partition.alpha=0.1, strategy=FedAvg",
    ]
    assert float(rows[1]["label_tv_mean"]) == pytest.approx(0.7)
    assert float(rows[1]["label_tv_std"]) == pytest.approx(0.1414, abs=1e-4)
    assert int(rows[1]["partitions"]) == 2  # two seeds, two partitions
    assert "0.70 ± 0.14" in (out / C.REPORT_MD).read_text()

    # Grouped by alpha only: the strategies are pooled; IID first by heterogeneity.
    argv = ["report", str(sweep), "--out", str(out), "--group-by", "partition.alpha",
            "--sort-by", "heterogeneity"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((out / C.REPORT_CSV).open()))
    assert [r["group"] for r in rows] == ["partition.alpha=100", "partition.alpha=0.1"]
    # alpha 0.1 over four runs: (0.3 + 0.4 + 0.5 + 0.6) / 4 = 0.45.
    assert float(rows[1]["test_accuracy_at_best_val_mean"]) == pytest.approx(0.45)
    assert int(rows[1]["runs"]) == 4


def test_report_refuses_an_unknown_sort_key(tmp_path):
    from fedvision.errors import FedvisionError
    from fedvision.report.table import summarise

    with pytest.raises(FedvisionError, match="sort by 'speed'"):
        summarise([], 0.5, sort_by="speed")


def test_privacy_runs_get_an_epsilon_column_and_an_accuracy_against_epsilon_plot(tmp_path):
    sweep = tmp_path / "sweep"
    for name, seed, alpha, best, eps in (("0", 0, 0.5, 0.3, 2.0), ("1", 1, 0.5, 0.4, 4.0)):
        fake_run(sweep / name, seed=seed, alpha=alpha, accs=[0.1, best], best=best)
        summary = json.loads((sweep / name / C.RUN_SUMMARY).read_text())
        summary.update(epsilon=eps, privacy={"delta": 1e-5})
        (sweep / name / C.RUN_SUMMARY).write_text(json.dumps(summary))
    fake_run(sweep / "2", seed=0, alpha=0.1, accs=[0.1, 0.6], best=0.6)  # no DP
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    text = (out / C.REPORT_MD).read_text()
    assert "ε (δ)" in text and "3.00 ± 1.41 (1e-05)" in text  # (2 + 4) / 2, std sqrt(2)
    assert (out / C.REPORT_PRIVACY_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_privacy_plot_without_private_runs(tmp_path):
    fake_run(tmp_path / "run", seed=0, alpha=0.5, accs=[0.1, 0.5], best=0.5)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    assert not (tmp_path / "rep" / C.REPORT_PRIVACY_PLOT).exists()
    assert "ε" not in (tmp_path / "rep" / C.REPORT_MD).read_text()
