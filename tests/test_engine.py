"""Engine: proximal term, local training, evaluation, config validation, device choice."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedvision.engine import (
    TrainConfig,
    evaluate,
    proximal_term,
    resolve_device,
    snapshot_params,
    train_local,
    warmup_cosine,
)
from fedvision.engine.train import _resident
from fedvision.errors import FedvisionError

CPU = torch.device("cpu")


# --- proximal term ---------------------------------------------------------------------------


def _tiny_linear() -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.copy_(torch.tensor([3.0]))
    return layer


def test_proximal_value_and_gradient_by_hand() -> None:
    model = _tiny_linear()
    global_params = [torch.tensor([[0.0, 0.0]]), torch.tensor([1.0])]
    term = proximal_term(list(model.parameters()), global_params, mu=0.5)
    # ||w - g||^2 = 1 + 4 + (3 - 1)^2 = 9; mu / 2 * 9 = 2.25
    assert term.item() == pytest.approx(2.25)
    term.backward()
    # d/dw = mu * (w - g) = 0.5 * [1, 2] and 0.5 * 2
    assert torch.allclose(model.weight.grad, torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([1.0]))


def test_proximal_stays_correct_across_batches() -> None:
    model = _tiny_linear()
    global_params = snapshot_params(model)
    params = list(model.parameters())
    expected = [0.0, 1.5, 6.0]  # mu=1: shift every one of 3 entries by d -> 1/2 * 3 d^2
    for step, want in enumerate(expected):
        with torch.no_grad():
            for p in params:
                p.add_(1.0 if step else 0.0)
        assert proximal_term(params, global_params, mu=1.0).item() == pytest.approx(want)


def test_proximal_rejects_a_generator() -> None:
    model = _tiny_linear()
    with pytest.raises(TypeError, match="lists"):
        proximal_term(list(model.parameters()), (p.detach() for p in model.parameters()), 1.0)


def test_snapshot_params_are_detached_clones() -> None:
    model = _tiny_linear()
    snap = snapshot_params(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(snap[0], torch.tensor([[1.0, 2.0]]))
    assert not snap[0].requires_grad


# --- local training --------------------------------------------------------------------------


def _separable(n: int = 64, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 = dark images, class 1 = bright images, with noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    base = np.where(labels == 1, 190, 60).astype(np.int16)[:, None, None, None]
    noise = rng.integers(-40, 41, size=(n, 3, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(4, 2),
    )


def _memmap(tmp_path, images: np.ndarray) -> np.memmap:
    path = tmp_path / "images.u8"
    images.tofile(path)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)


def test_train_local_learns_separable_problem(tmp_path) -> None:
    images, labels = _separable()
    images = _memmap(tmp_path, images)
    indices = np.arange(0, 64, dtype=np.int64)
    model = _tiny_cnn()
    before = evaluate(model, images, labels, device=CPU)
    cfg = TrainConfig(epochs=8, batch_size=16, lr=0.1, augment="light")
    result = train_local(model, images, labels, indices, cfg, CPU)
    after = evaluate(model, images, labels, device=CPU)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy == 1.0
    assert result.num_examples == 64
    assert result.steps == 8 * 4 and result.samples_seen == 8 * 64
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds > 0


def test_train_local_is_deterministic_and_leaves_global_rng_alone() -> None:
    images, labels = _separable()
    indices = np.arange(5, 60, dtype=np.int64)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, augment="standard", seed=3)
    start = _tiny_cnn()
    a, b, c = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    res_a = train_local(a, images, labels, indices, cfg, CPU)
    assert torch.equal(torch.get_rng_state(), rng_before)
    res_b = train_local(b, images, labels, indices, cfg, CPU)
    train_local(c, images, labels, indices, TrainConfig(**{**vars(cfg), "seed": 4}), CPU)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a[0].weight, c[0].weight)
    assert res_a.loss == res_b.loss


def test_train_local_moves_a_model_only_when_a_tensor_is_elsewhere(monkeypatch) -> None:
    """A cohort worker's resident model is not walked by Module.to each client; one tensor
    elsewhere (here a buffer on the meta device) still moves the whole model."""
    images, labels = _separable()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, augment="none", seed=0)
    model = _tiny_cnn()
    moves = []
    original = nn.Module.to

    def counting_to(self, *args, **kwargs):
        moves.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", counting_to)
    train_local(model, images, labels, np.arange(16), cfg, CPU)
    assert moves == []  # resident on the CPU already
    assert _resident(model, CPU)
    model.register_buffer("moved", torch.zeros(2, device="meta"))
    assert not _resident(model, CPU)
    with pytest.raises(NotImplementedError):  # meta has no data to copy: .to was called
        train_local(model, images, labels, np.arange(16), cfg, CPU)
    assert moves == [(CPU,)]


def _distance(model: nn.Module, ref: list[torch.Tensor]) -> float:
    return math.sqrt(
        sum(((p - g) ** 2).sum().item() for p, g in zip(model.parameters(), ref, strict=True))
    )


def test_large_proximal_mu_keeps_weights_near_global() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    start = _tiny_cnn()
    ref = snapshot_params(start)
    moved = {}
    # lr * mu = 1: strong pull to the global weights while SGD stays stable (needs lr * mu < 2).
    for mu in (0.0, 20.0):
        model = copy.deepcopy(start)
        cfg = TrainConfig(
            epochs=6, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, proximal_mu=mu
        )
        train_local(model, images, labels, indices, cfg, CPU)
        moved[mu] = _distance(model, ref)
    assert moved[20.0] < 0.2 * moved[0.0]


def test_max_steps_and_batch_tail() -> None:
    images, labels = _separable(n=40)
    model = _tiny_cnn()
    res = train_local(model, images, labels, np.arange(33), TrainConfig(epochs=5, max_steps=3), CPU)
    # 33 samples, batch 32: the one-sample tail joins the first batch -> 1 step of 33 per epoch.
    assert res.steps == 3 and res.samples_seen == 99
    res = train_local(
        model, images, labels, np.arange(10), TrainConfig(epochs=0, max_steps=5, batch_size=4), CPU
    )
    assert res.steps == 5 and res.samples_seen == 4 + 4 + 2 + 4 + 4
    res = train_local(model, images, labels, np.array([7]), TrainConfig(optimizer="adam"), CPU)
    assert res.steps == 1 and res.num_examples == 1


def test_empty_indices() -> None:
    images, labels = _separable(n=8)
    with pytest.raises(FedvisionError, match="empty"):
        train_local(_tiny_cnn(), images, labels, np.array([], dtype=np.int64), TrainConfig(), CPU)
    res = evaluate(_tiny_cnn(), images, labels, np.array([], dtype=np.int64), device=CPU)
    assert res.num_examples == 0


class _Channel0Mean(nn.Module):
    """Logits [m, -m] where m is the mean of channel 0 of the normalised image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0].mean(dim=(1, 2))
        return torch.stack([m, -m], dim=1)


def test_evaluate_by_hand() -> None:
    images = np.zeros((4, 3, 4, 4), dtype=np.uint8)
    images[[0, 2]] = 255  # bright -> m = (1 - 0.485) / 0.229 = 2.248908 -> class 0
    labels = np.array([0, 1, 1, 1], dtype=np.int64)  # dark -> m = -0.485 / 0.229 -> class 1
    res = evaluate(_Channel0Mean(), images, labels, batch_size=3, device="cpu")
    assert res.num_examples == 4 and res.accuracy == 0.75
    bright, dark = 2.248908, -2.117904
    # cross-entropy of logits [m, -m]: label 0 -> log(1 + e^{-2m}), label 1 -> log(1 + e^{2m})
    losses = [
        math.log1p(math.exp(-2 * bright)),
        math.log1p(math.exp(2 * dark)),
        math.log1p(math.exp(2 * bright)),
        math.log1p(math.exp(2 * dark)),
    ]
    assert res.loss == pytest.approx(sum(losses) / 4, abs=1e-5)
    sub = evaluate(_Channel0Mean(), images, labels, np.array([2, 0]), device=CPU)
    assert sub.num_examples == 2 and sub.accuracy == 0.5


# --- config and device -----------------------------------------------------------------------


def test_config_from_mapping_reads_flower_keys() -> None:
    cfg = TrainConfig.from_mapping(
        {"lr": "0.1", "proximal-mu": 0.5, "server-round": 3, "max_steps": 0, "amp": "false"}
    )
    assert cfg.lr == 0.1 and cfg.proximal_mu == 0.5 and cfg.max_steps is None and not cfg.amp


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs >= 1 or max_steps >= 1"),
        ({"optimizer": "rmsprop"}, "sgd, adam"),
        ({"augment": "heavy"}, "none, light, standard"),
        ({"epochs": 1.5}, "epochs"),
        ({"bn_mode": "frozen"}, "bn_mode must be one of train, eval"),
        ({"backbone_lr_factor": 1.5}, r"backbone_lr_factor must be in \[0, 1\]"),
        ({"backbone_lr_factor": -0.1}, "backbone_lr_factor"),
    ],
)
def test_config_validation(mapping: dict, message: str) -> None:
    with pytest.raises(FedvisionError, match=message):
        TrainConfig.from_mapping(mapping)


def test_config_strict_rejects_unknown_keys() -> None:
    with pytest.raises(FedvisionError, match="learning_rate"):
        TrainConfig.from_mapping({"learning_rate": 0.1}, strict=True)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(FedvisionError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FedvisionError, match="CUDA is not available"):
            resolve_device("cuda")


# --- centralised training over several calls (pretraining) ------------------------------------


def test_warmup_cosine_by_hand() -> None:
    # warm-up 2 steps: lr/3, 2lr/3; then cosine over steps 2..5: t = 0, 1/3, 2/3, 1.
    got = [warmup_cosine(s, 6, 2, 1.0, 0.0) for s in range(6)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.25, 0.0])
    assert warmup_cosine(3, 4, 0, 0.2, 0.1) == pytest.approx(0.1)  # ends at lr_min


def test_lr_at_sets_every_steps_rate() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, augment="none", weight_decay=0.0)
    frozen = _tiny_cnn()
    before = copy.deepcopy(frozen.state_dict())
    train_local(frozen, images, labels, indices, cfg, CPU, lr_at=lambda step: 0.0)
    # lr 0 on every step: parameters stay (BatchNorm's running statistics still move).
    assert torch.equal(frozen[0].weight, before["0.weight"])
    assert not torch.equal(frozen[1].running_mean, before["1.running_mean"])
    seen: list[float] = []
    model = _tiny_cnn()
    train_local(model, images, labels, indices, cfg, CPU, lr_at=lambda s: seen.append(s) or 0.01)
    assert seen == [0, 1, 2, 3]


def test_optimizer_state_carries_momentum_between_calls() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, augment="none", weight_decay=0.0)
    start = _tiny_cnn()
    first = train_local(start, images, labels, indices, cfg, CPU, keep_optimizer_state=True)
    assert first.optimizer_state is not None
    buffers = [s["momentum_buffer"] for s in first.optimizer_state["state"].values()]
    assert len(buffers) == len(list(start.parameters())) and all(b.abs().sum() > 0 for b in buffers)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    train_local(a, images, labels, indices, cfg, CPU, optimizer_state=first.optimizer_state)
    train_local(b, images, labels, indices, cfg, CPU)
    # With the carried momentum the second call moves the weights differently.
    assert not torch.equal(a[0].weight, b[0].weight)
    with pytest.raises(FedvisionError, match="optimiser state does not fit"):
        train_local(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), images, labels, indices,
                    cfg, CPU, optimizer_state=first.optimizer_state)  # fmt: skip


def test_label_smoothing_changes_the_loss_and_is_validated() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    base = TrainConfig(epochs=1, batch_size=64, lr=1e-9, augment="none")
    plain = train_local(_tiny_cnn(), images, labels, indices, base, CPU).loss
    smooth_cfg = TrainConfig(**{**vars(base), "label_smoothing": 0.5})
    smooth = train_local(_tiny_cnn(), images, labels, indices, smooth_cfg, CPU).loss
    # One step on identical logits: smoothing mixes in the uniform target's loss log(2).
    assert smooth == pytest.approx(0.5 * plain + 0.5 * _uniform_ce(_tiny_cnn(), images), rel=1e-4)
    with pytest.raises(FedvisionError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def _uniform_ce(model: nn.Module, images: np.ndarray) -> float:
    """Mean cross-entropy against the uniform target: -mean(log_softmax) over classes."""
    from fedvision.data.transforms import build_eval_transform

    model.train()
    torch.manual_seed(0)  # the engine seeds dropout with cfg.seed (0) the same way
    with torch.no_grad():
        logits = model(build_eval_transform()(torch.from_numpy(images)))
    return float(-torch.log_softmax(logits, 1).mean())


def test_bn_mode_eval_keeps_running_statistics_and_trains_scale_and_shift() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, augment="none", bn_mode="eval")
    model = _tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    train_local(model, images, labels, indices, cfg, CPU)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[key], before[key]), key
    assert not torch.equal(model[1].weight, before["1.weight"])
    assert not torch.equal(model[1].bias, before["1.bias"])
    # The same call in train mode moves the statistics: the switch is what kept them.
    moved = _tiny_cnn()
    train_local(moved, images, labels, indices, dataclasses.replace(cfg, bn_mode="train"), CPU)
    assert not torch.equal(moved[1].running_mean, before["1.running_mean"])


def test_backbone_lr_factor_scales_the_backbones_first_step_and_not_the_heads() -> None:
    """One plain SGD step from the same start: the backbone moves by factor x the full step."""
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    base = dict(epochs=0, max_steps=1, batch_size=16, lr=0.1, augment="none")
    base.update(momentum=0.0, weight_decay=0.0)
    start = _tiny_cnn()
    moves = {}
    for factor in (1.0, 0.5, 0.0):
        model = copy.deepcopy(start)
        cfg = TrainConfig(**base, backbone_lr_factor=factor)
        train_local(model, images, labels, indices, cfg, CPU)
        moves[factor] = {k: model.state_dict()[k] - v for k, v in start.state_dict().items()}
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(moves[0.5][key], 0.5 * moves[1.0][key], rtol=1e-4, atol=1e-6)
        assert torch.count_nonzero(moves[0.0][key]) == 0, key
        assert torch.count_nonzero(moves[1.0][key]) > 0, key
    for key in ("6.weight", "6.bias"):  # the head: full lr whatever the factor
        torch.testing.assert_close(moves[0.0][key], moves[1.0][key], rtol=1e-4, atol=1e-6)
        assert torch.count_nonzero(moves[0.0][key]) > 0


def test_backbone_lr_factor_applies_under_a_per_step_schedule() -> None:
    images, labels = _separable()
    indices = np.arange(64, dtype=np.int64)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, augment="none", backbone_lr_factor=0.0)
    model = _tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    train_local(model, images, labels, indices, cfg, CPU, lr_at=lambda step: 0.05)
    assert torch.equal(model[0].weight, before["0.weight"])
    assert not torch.equal(model[6].weight, before["6.weight"])
