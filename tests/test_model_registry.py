"""Registered (non-torchvision) architectures: NIID-Bench's simple_cnn, built like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models import (
    ARCHITECTURES,
    SimpleCNN,
    apply_finetune,
    build_model,
    build_model_reporting,
    find_head,
    fixed_input_size,
    list_architectures,
    trainable_parameters,
)
from fedvision.models.factory import _blocks

# Hand count for 10 classes: conv1 3*6*25+6, conv2 6*16*25+16, fc1 400*120+120, fc2 120*84+84,
# fc3 84*10+10.
SIMPLE_CNN_PARAMS = {
    "conv1": 456,
    "conv2": 2416,
    "fc1": 48120,
    "fc2": 10164,
    "fc3": 850,
}


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_registered_names_are_listed_and_not_torchvision_names() -> None:
    names = list_architectures()
    assert "simple_cnn" in names and "resnet18" in names and names == sorted(names)
    assert not set(ARCHITECTURES) & set(torchvision.models.list_models(module=torchvision.models))
    assert fixed_input_size("simple_cnn") == 32 and fixed_input_size("resnet18") is None


def test_simple_cnn_output_shape_at_32_px() -> None:
    torch.manual_seed(0)
    model = build_model("simple_cnn", 10).eval()
    assert isinstance(model, SimpleCNN) and model.training is False
    with torch.no_grad():
        assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)
        assert build_model("simple_cnn", 3)(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_simple_cnn_parameter_count_by_hand() -> None:
    model = build_model("simple_cnn", 10)
    per_layer = {
        name: sum(p.numel() for p in mod.parameters()) for name, mod in model.named_children()
    }
    assert per_layer == SIMPLE_CNN_PARAMS
    assert sum(p.numel() for p in model.parameters()) == 62006 == sum(SIMPLE_CNN_PARAMS.values())


def test_simple_cnn_keys_are_niid_benchs() -> None:
    # NIID-Bench's SimpleCNN state dict: its checkpoints load as they are.
    keys = {f"{layer}.{kind}" for layer in SIMPLE_CNN_PARAMS for kind in ("weight", "bias")}
    assert set(build_model("simple_cnn", 10).state_dict()) == keys


def test_simple_cnn_other_image_size_is_one_clear_error() -> None:
    model = build_model("simple_cnn", 10)
    with pytest.raises(FedvisionError, match=r"takes 32x32 images, got 64x64; set data\.size=32"):
        model(torch.rand(1, 3, 64, 64))


def test_find_head_is_the_last_linear() -> None:
    model = build_model("simple_cnn", 7)
    name, head = find_head(model)
    assert name == "fc3" and head is model.fc3
    assert isinstance(head, nn.Linear) and head.out_features == 7 and head.in_features == 84


def test_finetune_head_trains_only_the_last_layer() -> None:
    model = build_model("simple_cnn", 10, finetune="head")
    assert _trainable_names(model) == {"fc3.weight", "fc3.bias"}
    # One SGD step moves fc3 and nothing else.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    torch.manual_seed(0)
    loss = nn.functional.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc3.weight", "fc3.bias"}


def test_last_k_blocks_are_the_conv_and_fc_layers() -> None:
    model = build_model("simple_cnn", 10)
    assert [n for n, _ in _blocks(model, find_head(model)[0])] == ["conv1", "conv2", "fc1", "fc2"]
    expected = {
        1: {"fc2", "fc3"},
        2: {"fc1", "fc2", "fc3"},
        4: {"conv1", "conv2", "fc1", "fc2", "fc3"},
    }
    for k, layers in expected.items():
        apply_finetune(model, "last_k", last_k=k)
        assert _trainable_names(model) == {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    apply_finetune(model, "full")
    assert len(trainable_parameters(model)) == 10
    with pytest.raises(FedvisionError, match=r"choose 1\.\.4"):
        build_model("simple_cnn", 10, finetune="last_k", last_k=5)


def test_unknown_name_still_suggests_close_names() -> None:
    with pytest.raises(FedvisionError, match="did you mean simple_cnn"):
        build_model("simple_cn", 10)
    with pytest.raises(FedvisionError, match=r"did you mean .*resnet18"):
        build_model("resnet19", 10)


def test_simple_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(FedvisionError, match="simple_cnn has no ImageNet weights") as info:
        build_model("simple_cnn", 10, weights="imagenet")
    assert "\n" not in str(info.value)


def test_simple_cnn_checkpoint_round_trip_and_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("simple_cnn", 10)
    path = tmp_path / "simple_cnn.pt"
    torch.save({"model": src.state_dict()}, path)
    torch.manual_seed(1)
    same, report = build_model_reporting("simple_cnn", 10, weights=str(path))
    assert report is not None and report.reinitialised == ()
    for key, tensor in same.state_dict().items():
        assert torch.equal(tensor, src.state_dict()[key]), key
    other, report = build_model_reporting("simple_cnn", 4, weights=str(path))
    assert report is not None and report.reinitialised == ("fc3.weight", "fc3.bias")
    assert torch.equal(other.fc2.weight, src.fc2.weight) and other.fc3.out_features == 4
    assert "the checkpoint's head has 10 classes, this model 4" in report.summary()


def test_the_models_normalisation_travels_to_the_clients_and_the_engine():
    from omegaconf import OmegaConf

    from fedvision.config import compose_config
    from fedvision.engine import evaluate
    from fedvision.fl.round_config import to_train_config, train_config

    def record(*overrides: str) -> dict:
        cfg = OmegaConf.to_container(compose_config(list(overrides)), resolve=True)
        return {**train_config(cfg, 1, 10), "server-round": 1}

    raw = record("model=simple_cnn", "data.size=32")
    assert raw["normalise"] == "none" and to_train_config(raw, 0).normalise == "none"
    assert record()["normalise"] == "imagenet"  # the default model keeps ImageNet's mean/std
    # The engine evaluates on raw [0, 1] pixels when told so: the logits are model(x / 255).
    torch.manual_seed(0)
    model = build_model("simple_cnn", 3).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits = model(images.float() / 255)
    want = float(torch.nn.functional.cross_entropy(logits, labels))
    got = evaluate(model, images.numpy(), labels.numpy(), device="cpu", normalise="none")
    assert got.loss == pytest.approx(want, rel=1e-5)
    normalised = evaluate(model, images.numpy(), labels.numpy(), device="cpu")
    assert normalised.loss != pytest.approx(want, rel=1e-3)
