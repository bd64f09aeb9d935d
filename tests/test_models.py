"""Model factory: heads, offline weights, checkpoints, fine-tune modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models import (
    apply_finetune,
    build_model,
    build_model_reporting,
    find_head,
    list_architectures,
    model_num_bytes,
    set_train_mode,
    trainable_parameters,
)
from fedvision.models.factory import _replace_head

SMALL = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5"]


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _save(tmp_path: Path, obj: object, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_list_architectures_is_sorted_classification_only() -> None:
    names = list_architectures()
    assert names == sorted(names)
    assert {"resnet18", "mobilenet_v3_small", "vit_b_16"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names


@pytest.mark.parametrize("name", SMALL)
def test_head_has_num_classes_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "head_name"),
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("squeezenet1_1", "classifier.1")],
)
def test_replace_head_of_a_1000_class_model(name: str, head_name: str) -> None:
    model = torchvision.models.get_model(name, weights=None)
    _replace_head(model, 5)
    assert find_head(model)[0] == head_name
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(FedvisionError, match="resnet18"):
        build_model("resnet19", 10)


def test_missing_imagenet_weights_name_the_file(torch_home: Path) -> None:
    with pytest.raises(FedvisionError) as info:
        build_model("resnet18", 10, weights="imagenet")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(torch_home) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert not torch_home.exists() or not any(torch_home.iterdir())


def test_corrupt_imagenet_weights_are_a_clear_error(torch_home: Path) -> None:
    torch_home.mkdir(parents=True)
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FedvisionError, match=r"resnet18-f37072fd\.pth"):
        build_model("resnet18", 10, weights="imagenet")


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_checkpoint_round_trip(tmp_path: Path, wrap: str | None) -> None:
    torch.manual_seed(0)
    src = build_model("resnet18", 10)
    state = src.state_dict()
    path = _save(tmp_path, state if wrap is None else {wrap: state})
    torch.manual_seed(1)
    dst = build_model("resnet18", 10, weights=str(path))
    for key, tensor in dst.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_checkpoint_with_other_num_classes_is_reported(tmp_path: Path) -> None:
    path = _save(tmp_path, build_model("resnet18", 20).state_dict())
    with pytest.raises(FedvisionError, match=r"head \(fc\) has 20 classes, this run has 10"):
        build_model("resnet18", 10, weights=str(path), allow_head_mismatch=False)


def test_allow_head_mismatch_loads_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("resnet18", 20)
    path = _save(tmp_path, {"model": src.state_dict()})
    torch.manual_seed(1)
    dst = build_model("resnet18", 10, weights=str(path), allow_head_mismatch=True)
    assert torch.equal(dst.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert torch.equal(dst.bn1.running_var, src.bn1.running_var)
    assert dst.fc.weight.shape == (10, 512)


def test_load_report_names_kept_and_reinitialised_layers(tmp_path: Path) -> None:
    src = build_model("resnet18", 20)
    path = _save(tmp_path, {"model": src.state_dict(), "arch": "resnet18"})
    _, report = build_model_reporting("resnet18", 10, weights=str(path))
    assert report is not None
    assert report.reinitialised == ("fc.weight", "fc.bias")
    assert len(report.kept) == len(src.state_dict()) - 2 and "bn1.running_mean" in report.kept
    line = report.summary()
    assert "kept conv1, bn1, layer1, layer2, layer3, layer4 (" in line
    assert "re-initialised fc.weight, fc.bias (the checkpoint's head has 20 classes" in line
    # Same number of classes: everything kept, nothing re-initialised.
    _, same = build_model_reporting("resnet18", 20, weights=str(path))
    assert same is not None and same.reinitialised == () and "re-initialised" not in same.summary()
    assert build_model_reporting("resnet18", 20)[1] is None


def test_backbone_shape_mismatch_names_layer_and_shapes(tmp_path: Path) -> None:
    state = build_model("resnet18", 10).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = _save(tmp_path, state)
    with pytest.raises(FedvisionError, match=r"layer1\.0\.conv1\.weight.*\(64, 64, 1, 1\).*"):
        build_model("resnet18", 10, weights=str(path), allow_head_mismatch=True)


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    path = _save(tmp_path, build_model("squeezenet1_1", 10).state_dict())
    with pytest.raises(FedvisionError, match="missing"):
        build_model("resnet18", 10, weights=str(path))


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FedvisionError, match="does not exist"):
        build_model("resnet18", 10, weights=str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(FedvisionError, match="cannot read checkpoint"):
        build_model("resnet18", 10, weights=str(bad))
    with pytest.raises(FedvisionError, match="not a state dict"):
        build_model("resnet18", 10, weights=str(_save(tmp_path, [1, 2, 3], "list.pt")))


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_modes_on_resnet18() -> None:
    model = build_model("resnet18", 10, finetune="full")
    assert len(trainable_parameters(model)) == len(list(model.parameters()))

    model = build_model("resnet18", 10, finetune="head")
    assert _trainable_names(model) == {"fc.weight", "fc.bias"}

    model = build_model("resnet18", 10, finetune="last_k", last_k=1)
    names = _trainable_names(model)
    assert "fc.weight" in names and "layer4.1.bn2.weight" in names
    assert all(n.startswith(("layer4.", "fc.")) for n in names)

    apply_finetune(model, "last_k", last_k=2)
    assert "layer3.0.conv1.weight" in _trainable_names(model)
    assert "layer2.1.conv2.weight" not in _trainable_names(model)


def test_finetune_last_k_on_mobilenet_uses_feature_blocks() -> None:
    model = build_model("mobilenet_v3_small", 10, finetune="last_k", last_k=1)
    names = _trainable_names(model)
    assert "features.12.0.weight" in names and "classifier.3.weight" in names
    assert not any(n.startswith("features.11.") for n in names)


def test_finetune_bad_values() -> None:
    with pytest.raises(FedvisionError, match=r"choose 1\.\.4"):
        build_model("resnet18", 10, finetune="last_k", last_k=5)
    with pytest.raises(FedvisionError, match="full, head, last_k"):
        build_model("resnet18", 10, finetune="partial")


def test_set_train_mode_keeps_frozen_batchnorm_in_eval() -> None:
    model = build_model("resnet18", 10, finetune="last_k", last_k=1)
    set_train_mode(model)
    assert model.training and model.fc.training
    assert not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


def test_model_num_bytes_by_hand() -> None:
    # Linear(3, 2): 6 + 2 float32 = 32 bytes; BatchNorm1d(2): 4 x 2 float32 + int64 counter = 40.
    assert model_num_bytes(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))) == 72
