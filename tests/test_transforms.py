"""Batch augmentation presets and the eval transform."""

from __future__ import annotations

import pytest
import torch

from fedvision.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
)
from fedvision.errors import FedvisionError

# (128 / 255 - mean) / std per channel, worked out by hand: 128 / 255 = 0.501961.
CONST_128 = (0.074065, 0.205183, 0.426493)


def _ramp_batch(b: int = 8, s: int = 16) -> torch.Tensor:
    """``b`` identical images whose pixels all differ (a horizontal + vertical ramp)."""
    img = (torch.arange(3 * s * s) % 251).to(torch.uint8).view(3, s, s)
    return img.expand(b, 3, s, s).contiguous()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_presets_constant() -> None:
    assert PRESETS == ("none", "light", "standard", "cifar")


@pytest.mark.parametrize("preset", ["none", "light"])
def test_constant_image_normalised_by_hand(preset: str) -> None:
    images = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    out = build_train_transform(preset)(images, generator=_gen())
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, 8, 8)
    for c, expected in enumerate(CONST_128):
        assert torch.allclose(out[:, c], torch.full((2, 8, 8), expected), atol=1e-5)


def test_eval_resize_shape_and_black_white_values() -> None:
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    images[1] = 255
    out = build_eval_transform(out_size=8)(images)
    assert out.shape == (4, 3, 8, 8) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-5)
    assert out[1, 2, 3, 3].item() == pytest.approx((1 - 0.406) / 0.225, abs=1e-5)


@pytest.mark.parametrize("preset", ["light", "standard"])
def test_train_output_shape_and_range(preset: str) -> None:
    images = torch.randint(0, 256, (5, 3, 16, 16), generator=_gen(1), dtype=torch.uint8)
    out = build_train_transform(preset, out_size=12)(images, generator=_gen())
    assert out.shape == (5, 3, 12, 12) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = out * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


@pytest.mark.parametrize("preset", ["light", "standard"])
def test_randomness_is_per_sample(preset: str) -> None:
    out = build_train_transform(preset)(_ramp_batch(8), generator=_gen())
    distinct = {tuple(out[i].flatten()[:64].tolist()) for i in range(8)}
    assert len(distinct) == 8


def test_flip_only_transform_gives_identity_or_mirror_per_sample() -> None:
    images = _ramp_batch(16)
    flip_only = TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = flip_only(images, generator=_gen(3))
    ref = build_eval_transform()(images[0])
    same = [torch.allclose(o, ref, atol=1e-5) for o in out]
    mirrored = [torch.allclose(o, ref.flip(-1), atol=1e-5) for o in out]
    assert all(s != m for s, m in zip(same, mirrored, strict=True))
    assert 0 < sum(same) < 16


def test_same_seed_same_output_other_seed_differs() -> None:
    tf = build_train_transform("standard")
    images = _ramp_batch(4)
    a = tf(images, generator=_gen(7))
    b = tf(images, generator=_gen(7))
    c = tf(images, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_none_preset_equals_eval_transform() -> None:
    images = torch.randint(0, 256, (3, 3, 10, 10), generator=_gen(2), dtype=torch.uint8)
    a = build_train_transform("none", out_size=6)(images, generator=_gen())
    b = build_eval_transform(out_size=6)(images)
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset", PRESETS)
def test_single_image_matches_batch_of_one(preset: str) -> None:
    image = torch.randint(0, 256, (3, 12, 12), generator=_gen(4), dtype=torch.uint8)
    tf = build_train_transform(preset, out_size=8)
    single = tf(image, generator=_gen(5))
    batch = tf(image.unsqueeze(0), generator=_gen(5))
    assert single.shape == (3, 8, 8)
    assert torch.equal(single, batch[0])


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(FedvisionError, match="none, light, standard"):
        build_train_transform("heavy")
