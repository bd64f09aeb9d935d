"""The real-data experiments compose, name the shared data folder, and pass every early check."""

from __future__ import annotations

import pytest

from fedvision.config import compose_config
from fedvision.paths import shared_data_dir
from fedvision.runner import check_config

EXPERIMENTS = ("imagenette", "niid_bench_cifar10", "cifar10_pretrained")


def test_shared_data_resolves_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDVISION_SHARED_DATA", str(tmp_path))
    cfg = compose_config(["experiment=imagenette"])
    assert cfg.data.root == str(tmp_path / "imagenette")
    assert cfg.model.weights == str(tmp_path / "weights" / "mobilenet_v2_imagenet.pth")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_passes_the_checks_on_the_shared_data(name):
    if not (shared_data_dir() / "weights").is_dir():
        pytest.skip(f"{shared_data_dir()} is absent (shared data; set $FEDVISION_SHARED_DATA)")
    cfg = compose_config([f"experiment={name}", "runtime=prepare_only"])
    check_config(cfg)  # weights file, sizes, strategy, every round's config
    assert (shared_data_dir() / str(cfg.data.root).rsplit("/", 1)[-1] / "train").is_dir()


def test_niid_bench_is_the_papers_setting():
    cfg = compose_config(["experiment=niid_bench_cifar10"])
    assert (cfg.model.name, cfg.model.normalise, cfg.data.size) == ("simple_cnn", "none", 32)
    assert (cfg.num_clients, cfg.num_rounds, cfg.partition.alpha) == (10, 50, 0.5)
    c = cfg.client
    assert (c.local_epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.augment) == (
        10, 64, 0.01, 0.9, 1e-5, "cifar",
    )  # fmt: skip
    assert cfg.strategy.fraction_train == 1.0
