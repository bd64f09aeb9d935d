"""Batch augmentation and evaluation transforms on uint8 image tensors (CPU or CUDA).

Every transform takes a uint8 tensor ``[B, 3, H, W]`` or ``[3, H, W]`` on any device and an
optional CPU ``torch.Generator``, and returns float32 ImageNet-normalised images of the same rank.
Random parameters are drawn on the CPU from the generator and then moved to the image's device,
so a seed gives the same augmentation on a CPU and on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedvision.errors import FedvisionError

PRESETS: tuple[str, ...] = ("none", "light", "standard")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma weights, the ones torchvision's rgb_to_grayscale uses.
_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

ImageTransform = Callable[..., torch.Tensor]


def _to_float_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return a float32 ``[B, 3, H, W]`` batch in [0, 1] and whether the input was one image."""
    if images.dim() == 3:
        images, single = images.unsqueeze(0), True
    elif images.dim() == 4:
        single = False
    else:
        raise ValueError(
            f"expected an image tensor [3,H,W] or [B,3,H,W], got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float().div_(255.0), single
    return images.float(), single


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize(x: torch.Tensor, out_size: int | None) -> torch.Tensor:
    if out_size is None or (x.shape[-2] == out_size and x.shape[-1] == out_size):
        return x
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


class EvalTransform:
    """uint8 -> float32, optional square resize, ImageNet mean/std normalisation.

    Parameters
    ----------
    out_size
        Output side length; ``None`` keeps the input size.
    """

    def __init__(self, out_size: int | None = None) -> None:
        self.out_size = out_size

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x, single = _to_float_batch(images)
        x = _normalise(_resize(x, self.out_size))
        return x[0] if single else x


class TrainTransform:
    """Per-sample random resized crop + horizontal flip (+ colour jitter), then normalisation.

    torchvision's v2 transforms draw one set of parameters per call (every image of a batch would
    get the same crop), so this is a small vectorised version: crop, scale and flip of each sample
    are one affine ``theta`` fed to ``F.affine_grid`` + ``F.grid_sample``, jitter uses per-sample
    factors.

    Parameters
    ----------
    scale
        Range of the crop's area as a fraction of the image (RandomResizedCrop's ``scale``).
    ratio
        Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    jitter
        Strength of brightness, contrast and saturation jitter (factor in ``[1-j, 1+j]``); 0 = off.
    out_size
        Output side length; ``None`` keeps the input size.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.0,
        out_size: int | None = None,
    ) -> None:
        self.scale = scale
        self.ratio = ratio
        self.jitter = jitter
        self.out_size = out_size

    def _theta(self, b: int, generator: torch.Generator | None) -> torch.Tensor:
        area = _uniform(b, self.scale[0], self.scale[1], generator)
        log_r = _uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        ratio = torch.exp(log_r)
        # Crop width/height as fractions of the image side; clamped so the crop stays inside.
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
        flip = torch.rand(b, generator=generator) < 0.5
        sx = torch.where(flip, -w, w)
        zero = torch.zeros(b)
        return torch.stack(
            [torch.stack([sx, zero, cx], dim=1), torch.stack([zero, h, cy], dim=1)], dim=1
        )

    def _colour(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, j = x.shape[0], self.jitter
        factors = _uniform(3 * b, 1 - j, 1 + j, generator).view(3, b, 1, 1, 1).to(x.device)
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        # Same blend formulas as torchvision's adjust_brightness/contrast/saturation.
        x = (x * factors[0]).clamp_(0, 1)
        gray_mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = ((x - gray_mean) * factors[1] + gray_mean).clamp_(0, 1)
        gray = (x * luma).sum(1, keepdim=True)
        return ((x - gray) * factors[2] + gray).clamp_(0, 1)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x, single = _to_float_batch(images)
        b, c, hgt, _ = x.shape
        out = self.out_size or hgt
        theta = self._theta(b, generator).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [b, c, out, out], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            x = self._colour(x, generator)
        x = _normalise(x)
        return x[0] if single else x


def build_train_transform(preset: str, out_size: int | None = None) -> ImageTransform:
    """Return the training transform for an augmentation preset.

    Parameters
    ----------
    preset
        One of :data:`PRESETS`: ``none`` (eval transform), ``light`` (flip + random resized crop
        with scale (0.8, 1)), ``standard`` (flip + random resized crop with scale (0.35, 1) +
        brightness/contrast/saturation jitter 0.4).
    out_size
        Output side length; ``None`` keeps the input size.

    Returns
    -------
    Callable
        ``f(images_uint8, generator=None) -> float32 normalised images``.
    """
    if preset == "none":
        return EvalTransform(out_size)
    if preset == "light":
        return TrainTransform(scale=(0.8, 1.0), out_size=out_size)
    if preset == "standard":
        return TrainTransform(scale=(0.35, 1.0), jitter=0.4, out_size=out_size)
    raise FedvisionError(
        f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}"
    )


def build_eval_transform(out_size: int | None = None) -> ImageTransform:
    """Return the evaluation transform (uint8 -> float, optional resize, normalisation).

    Parameters
    ----------
    out_size
        Output side length; ``None`` keeps the input size.
    """
    return EvalTransform(out_size)
