"""``fedvision pretrain``: the run directory, resume, the checkpoint a run fine-tunes, the cache."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fedvision import constants as C
from fedvision import pretrain as P
from fedvision.cli import main as cli_main
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.models import build_model_reporting
from fedvision.runner import run_experiment


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 source + 4 target classes, 40 train / 10 val images each, 32 px."""
    return generate_dataset(
        tmp_path_factory.mktemp("data") / "gen",
        num_classes=7,
        num_source=3,
        train_per_class=40,
        val_per_class=10,
        size=32,
        workers=1,
        progress=False,
    )


def source(dataset: Path, **extra) -> list[str]:
    base = {
        "data.root": str(dataset),
        "data.classes_file": str(dataset / C.SOURCE_CLASSES),
        "data.size": 32,
        "data.workers": 1,
        "model": "shufflenet_v2_x0_5",  # the default model: 4x faster here than resnet18
        "recipe.epochs": 3,
        "recipe.batch_size": 32,
        "recipe.lr": 0.05,
        "progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _pretrain_cfg(dataset: Path, **extra):
    return compose_config(source(dataset, **extra), config_name="pretrain")


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre")
    return run_dir, P.run_pretrain(_pretrain_cfg(dataset), run_dir)


def test_pretraining_fills_its_run_directory_and_keeps_the_best_epoch(pretrained):
    run_dir, summary = pretrained
    for name in (C.RUN_CONFIG, C.RUN_CURVES, C.CKPT_LATEST, C.CKPT_BEST, C.RUN_SUMMARY):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / C.RUN_METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    accs = [r["val_accuracy"] for r in records]
    best_epoch = accs.index(max(accs))  # the first epoch reaching the maximum
    assert summary["best_epoch"] == best_epoch and summary["val_accuracy_best"] == max(accs)
    best = torch.load(run_dir / C.CKPT_BEST, weights_only=True)
    assert best["epoch"] == best_epoch and best["num_classes"] == 3
    # The cosine ends at lr * lr_min_factor = 0 on the last step.
    assert records[-1]["lr_end"] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    # Validation is 10 % of train (4 per class); the dataset's val split is the test split.
    assert (summary["val_images"], summary["train_images"], summary["test_images"]) == (12, 108, 30)
    at_best = records[best_epoch]["test_accuracy"]
    assert summary["test_accuracy_at_best_val"] == at_best is not None


def test_a_run_fine_tunes_the_checkpoint_with_a_new_head_and_says_so(dataset, pretrained, tmp_path):
    run_dir, _ = pretrained
    ckpt = run_dir / C.CKPT_BEST
    model, report = build_model_reporting("shufflenet_v2_x0_5", 3 + 2, weights=str(ckpt))
    assert report is not None and report.reinitialised == ("fc.weight", "fc.bias")
    src = _state(ckpt)
    own = model.state_dict()
    assert torch.equal(own["stage4.1.branch2.0.weight"], src["stage4.1.branch2.0.weight"])
    assert torch.equal(own["conv1.1.running_mean"], src["conv1.1.running_mean"])
    # Through `fedvision run` (prepared only): the round-0 model is the backbone + a new head,
    # and weights.json says which layers were kept.
    cfg = compose_config(
        [
            f"data.root={dataset}",
            f"data.classes_file={dataset / C.TARGET_CLASSES}",
            "data.size=32",
            "data.workers=1",
            f"model.weights={ckpt}",
            "num_clients=2",
            "runtime=prepare_only",
            "progress=false",
        ]
    )
    run_experiment(cfg, tmp_path / "run")
    initial = torch.load(tmp_path / "run" / C.RUN_INITIAL, weights_only=True)
    assert torch.equal(initial["stage2.0.branch1.0.weight"], src["stage2.0.branch1.0.weight"])
    assert initial["fc.weight"].shape == (4, 1024)
    load = json.loads((tmp_path / "run" / C.RUN_WEIGHTS).read_text())
    assert load["reinitialised"] == ["fc.weight", "fc.bias"] and load["checkpoint_classes"] == 3
    assert len(load["kept"]) == len(src) - 2


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(
    dataset, pretrained, tmp_path, monkeypatch
):
    ref_dir, _ = pretrained
    calls = {"n": 0}
    real = P.evaluate

    def interrupt_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2 (each epoch evaluates validation, then test)
            os.kill(os.getpid(), signal.SIGTERM)  # a service manager's stop, as Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "evaluate", interrupt_in_epoch_2)
    handler = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or one that Ray set in this process
    with pytest.raises(KeyboardInterrupt):
        P.run_pretrain(_pretrain_cfg(dataset), tmp_path)
    status = json.loads((tmp_path / C.RUN_STATUS).read_text())
    assert (status["status"], status["epoch"]) == ("interrupted", 1)
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    assert len((tmp_path / C.RUN_METRICS).read_text().splitlines()) == 1
    monkeypatch.setattr(P, "evaluate", real)
    with pytest.raises(SystemExit):  # Hydra's task returns; the CLI wrapper exits 0
        raise SystemExit(cli_main(["pretrain", f"resume={tmp_path}", "progress=false"]))
    ref, resumed = _state(ref_dir / C.CKPT_LATEST), _state(tmp_path / C.CKPT_LATEST)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    ref_metrics = (ref_dir / C.RUN_METRICS).read_text().splitlines()
    new_metrics = (tmp_path / C.RUN_METRICS).read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
        for line in (*ref_metrics, *new_metrics)
    ]
    assert strip[:3] == strip[3:]


def test_a_new_pretraining_run_into_a_used_directory_is_refused(dataset, pretrained, capsys):
    ref_dir, _ = pretrained
    before = {p: p.read_bytes() for p in ref_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(cli_main(["pretrain", *source(dataset), f"hydra.run.dir={ref_dir}"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ref_dir} already holds a run" in err[0]
    assert {p: p.read_bytes() for p in ref_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"recipe.warmup_epochs": 3}, "warmup_epochs=3 must lie in"),
        ({"recipe.optimizer": "adam"}, "use sgd or adamw"),
        ({"recipe.label_smoothing": 1.0}, "label_smoothing"),
        ({"recipe.epochs": 0}, "epochs=0"),
        ({"model.weights": "/no/such.pt"}, "no such file"),
    ],
)
def test_impossible_recipes_are_refused_before_data_work(dataset, tmp_path, extra, message):
    with pytest.raises(FedvisionError, match=message):
        P.run_pretrain(_pretrain_cfg(dataset, **extra), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_pretrained_model_is_cached_by_what_determines_it(dataset, monkeypatch):
    made: list[Path] = []
    real = P.run_pretrain

    def counting(cfg, run_dir, **kw):
        made.append(run_dir)
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(P, "run_pretrain", counting)

    def config(arch, size, *, progress=True, lr=0.05):
        return _pretrain_cfg(dataset, **{"recipe.epochs": 1, "recipe.lr": lr})

    monkeypatch.setattr(P, "default_pretrain_config", config)
    first = P.ensure_pretrained("shufflenet_v2_x0_5", 32)
    again = P.ensure_pretrained("shufflenet_v2_x0_5", 32)
    assert first == again and len(made) == 1
    assert first.is_file() and "shufflenet_v2_x0_5-32px-" in first.parent.name
    # Another recipe is another model.
    monkeypatch.setattr(
        P, "default_pretrain_config", lambda a, s, progress=True: config(a, s, lr=0.02)
    )
    other = P.ensure_pretrained("shufflenet_v2_x0_5", 32)
    assert other != first and len(made) == 2 and other.is_file()


def test_pretrained_on_a_users_folder_takes_the_best_start_and_says_which(
    dataset, tmp_path, monkeypatch, capsys
):
    from fedvision.models import imagenet_weights_file
    from fedvision.prepare import check_weights
    from fedvision.prepare import resolve_weights as resolve

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def resolve_weights(cfg):  # the built-in backbone's maker is the caller's
        return resolve(cfg, lambda arch, size, progress=True: Path("/b.pt"))

    cfg = compose_config([f"data.root={dataset}", "model.weights=pretrained", "progress=false"])
    check_weights(cfg.model, cfg.data)  # no longer refused
    # No ImageNet file on this machine: the built-in backbone, said in one line.
    assert resolve_weights(cfg) == "/b.pt"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "built-in backbone" in err and "model.weights=imagenet" in err
    # torchvision's file in the hub cache: ImageNet weights (no download: the file is there).
    file = imagenet_weights_file("shufflenet_v2_x0_5")
    assert file is not None and str(tmp_path / "torch") in str(file)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"")
    assert resolve_weights(cfg) == "imagenet"
    assert "starting from ImageNet weights" in capsys.readouterr().err
    # The built-in dataset keeps its own pretrained model, whatever the hub cache holds.
    assert resolve_weights(compose_config(["model.weights=pretrained"])) == "/b.pt"
    assert imagenet_weights_file("simple_cnn") is None


def test_run_with_a_missing_checkpoint_on_a_folder_dataset_fails_first(dataset, tmp_path):
    cfg = compose_config([f"data.root={dataset}", f"model.weights={tmp_path / 'nope.pt'}"])
    with pytest.raises(FedvisionError, match="no such file"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_recipe_composes_inside_a_running_hydra_task() -> None:
    # `fedvision run` (a Hydra task) composes conf/pretrain.yaml for model.weights=pretrained.
    from hydra import initialize_config_dir

    from fedvision.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = P.default_pretrain_config("resnet18", 48, progress=False)
    assert (cfg.model.name, cfg.data.size, cfg.data.subset) == ("resnet18", 48, "source")
