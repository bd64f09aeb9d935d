"""End-to-end federated runs in Flower's Ray simulation (small: 2 clients, 2 rounds, 32 px)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from fedvision import constants as C
from fedvision.cli import main as cli_main
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.report.metrics import RunRecorder, read_metrics
from fedvision.runner import run_experiment

RAY_OR_FLOWER = "raylet|gcs_server|flower-superlink|flower-supernode|flower-superexec|flwr-"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 target classes (+2 source), 150 train and 25 val images each, at 32 px."""
    return generate_dataset(
        tmp_path_factory.mktemp("data") / "gen",
        num_classes=6,
        num_source=2,
        train_per_class=150,
        val_per_class=25,
        size=32,
        workers=1,
        progress=False,
    )


def overrides(dataset, **extra) -> list[str]:
    base = {
        "data.root": str(dataset),
        "data.classes_file": str(dataset / "target_classes.txt"),
        "data.size": 32,
        "data.workers": 1,
        "num_clients": 2,
        "num_rounds": 2,
        "partition": "iid",
        "model.name": "resnet18",
        "client.local_epochs": 3,
        "client.lr": 0.01,
        "client.augment": "none",  # two rounds on 300 images: augmentation only slows learning
        "strategy.fraction_evaluate": 1.0,  # clients also evaluate on their local validation parts
        "strategy.min_evaluate_nodes": 1,
        "progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _no_ray_or_flower_left() -> bool:
    for _ in range(50):  # Ray's processes take a moment to exit after shutdown
        found = subprocess.run(["pgrep", "-f", RAY_OR_FLOWER], capture_output=True, text=True)
        if not found.stdout.strip():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """One uninterrupted run, shared by the tests that read it."""
    run_dir = tmp_path_factory.mktemp("ref")
    summary = run_experiment(compose_config(overrides(dataset)), run_dir)
    return run_dir, summary


def test_two_clients_two_rounds_learn_and_fill_the_run_directory(reference_run):
    run_dir, summary = reference_run
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        for key in ("accuracy", "loss", "train_loss", "num_clients", "bytes_down", "bytes_up"):
            assert r[key] is not None, key
        assert r["num_clients"] == 2 and r["round_s"] > 0
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0
        # Both directions carry one full model per client.
        assert r["bytes_down"] == r["bytes_up"] > 2 * 40e6
    chance = 1 / 4
    assert summary["final_accuracy"] > chance + 0.1, records
    assert summary["final_accuracy"] > records[0]["accuracy"]
    for key in ("final_accuracy", "best_accuracy", "best_round", "num_rounds", "wall_s"):
        assert key in summary
    for name in (
        C.RUN_CONFIG,
        C.RUN_VERSIONS,
        C.CKPT_LATEST,
        C.CKPT_BEST,
        C.RUN_CURVES,
        C.PARTITION_FILE,
        C.PARTITION_STATS,
        C.PARTITION_HEATMAP,
    ):
        assert (run_dir / name).is_file(), name
    ckpt = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)
    assert ckpt["round"] == 2 and ckpt["num_classes"] == 4
    assert json.loads((run_dir / C.RUN_VERSIONS).read_text())["flwr"].startswith("1.39")
    assert _no_ray_or_flower_left()


class _Interrupt(Exception):
    pass


def test_resumed_run_ends_with_the_metrics_of_an_uninterrupted_one(
    dataset, reference_run, tmp_path, monkeypatch
):
    ref_dir, ref_summary = reference_run
    run_dir = tmp_path / "interrupted"
    real_append = RunRecorder.append

    def append_until_round_2(self, record):
        if record["round"] == 2:
            raise _Interrupt("stopped after round 1")
        real_append(self, record)

    monkeypatch.setattr(RunRecorder, "append", append_until_round_2)
    with pytest.raises(_Interrupt):
        run_experiment(compose_config(overrides(dataset)), run_dir)
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]
    monkeypatch.setattr(RunRecorder, "append", real_append)

    # The user's path: the CLI, which continues in the run's own directory.
    assert cli_main(["run", f"resume={run_dir}"]) == 0
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["round"] for r in got] == [0, 1, 2]
    for g, w in zip(got, want, strict=True):
        for key in ("accuracy", "loss", "train_loss", "val_accuracy", "clients"):
            assert g.get(key) == w.get(key), (key, g, w)
    summary = json.loads((run_dir / C.RUN_SUMMARY).read_text())
    assert summary["final_accuracy"] == ref_summary["final_accuracy"]
    assert _no_ray_or_flower_left()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.name": "resnet1888"}, "resnet18"),
        ({"strategy.min_available_nodes": 5}, "only num_clients=2"),
        ({"strategy._target_": "flwr.serverapp.strategy.FedNope"}, "cannot build strategy"),
        ({"client.lr": -1}, "lr must be > 0"),
        ({"runtime.num_gpus_per_client": 0.25}, "no CUDA GPU"),
    ],
)
def test_impossible_settings_fail_before_ray_starts(dataset, tmp_path, extra, message):
    if "num_gpus_per_client" in str(extra) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t0 = time.perf_counter()
    with pytest.raises(FedvisionError, match=message):
        run_experiment(compose_config(overrides(dataset, **extra)), tmp_path)
    assert time.perf_counter() - t0 < 30  # refused up front, not after a simulation


def test_unknown_strategy_option_names_the_choices(dataset):
    with pytest.raises(FedvisionError, match="strategy/fedsgd"):
        compose_config([*overrides(dataset), "strategy=fedsgd"])


def test_checkpoint_for_another_number_of_classes_is_refused(dataset, tmp_path):
    from fedvision.models import build_model

    ckpt = tmp_path / "seven.pt"
    torch.save(build_model("resnet18", 7).state_dict(), ckpt)
    with pytest.raises(FedvisionError, match="7"):
        run_experiment(compose_config(overrides(dataset, **{"model.weights": ckpt})), tmp_path)


def test_cli_prints_user_errors_on_one_line(dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", *overrides(dataset, **{"num_rounds": 0})])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedvision: error: num_clients, num_rounds")
    assert not any("Traceback" in line for line in err)
