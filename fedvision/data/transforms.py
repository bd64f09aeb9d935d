"""Batch augmentation and evaluation transforms on uint8 image tensors (CPU or CUDA).

Every transform takes a uint8 tensor ``[B, 3, H, W]`` or ``[3, H, W]`` on any device and an
optional CPU ``torch.Generator``, and returns float32 images of the same rank, normalised as the
model was trained: ImageNet mean/std by default, or raw ``[0, 1]`` pixels (``normalise="none"``,
as NIID-Bench feeds its CNNs). Random parameters are drawn on the CPU from the generator and then
moved to the image's device, so a seed gives the same augmentation on a CPU and on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

from fedvision.errors import FedvisionError

PRESETS: tuple[str, ...] = ("none", "light", "standard", "cifar")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Name -> (mean, std) per channel, or None for raw [0, 1] pixels.
NORMALISATIONS: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = MappingProxyType(
    {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": None}
)
# torchvision's ImageNet evaluation: resize the shorter side to 256, centre-crop 224.
IMAGENET_RESIZE_RATIO: float = 256 / 224
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


def check_normalise(normalise: str) -> str:
    """Return ``normalise`` if it names an entry of :data:`NORMALISATIONS`, else raise.

    Raises
    ------
    FedvisionError
        ``normalise`` is unknown; the message lists the choices.
    """
    if normalise not in NORMALISATIONS:
        raise FedvisionError(
            f"unknown normalisation {normalise!r}; choose one of {', '.join(NORMALISATIONS)}"
        )
    return normalise


def _normalise(x: torch.Tensor, normalise: str = "imagenet") -> torch.Tensor:
    stats = NORMALISATIONS[normalise]
    if stats is None:
        return x
    mean = torch.tensor(stats[0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize(x: torch.Tensor, out_size: int | None) -> torch.Tensor:
    if out_size is None or (x.shape[-2] == out_size and x.shape[-1] == out_size):
        return x
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


class EvalTransform:
    """uint8 -> float32, optional square resize, normalisation (ImageNet mean/std by default).

    Parameters
    ----------
    out_size
        Output side length; ``None`` keeps the input size.
    normalise
        A key of :data:`NORMALISATIONS`.
    """

    def __init__(self, out_size: int | None = None, normalise: str = "imagenet") -> None:
        self.out_size = out_size
        self.normalise = check_normalise(normalise)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x, single = _to_float_batch(images)
        x = _normalise(_resize(x, self.out_size), self.normalise)
        return x[0] if single else x


class CenterCropEvalTransform:
    """torchvision's ImageNet evaluation on tensors: resize the shorter side, centre-crop.

    The shorter side goes to ``round(size * resize_ratio)`` (antialiased bilinear, aspect ratio
    kept), then the central ``size x size`` square is cut out and normalised; with the default
    ratio 256/224 this is ``Resize(256) + CenterCrop(224)`` scaled to ``size``. Pretrained ImageNet
    weights expect objects at that scale: a plain resize to ``size`` shows them slightly smaller.

    Parameters
    ----------
    size
        Output side length.
    resize_ratio
        Shorter side before the crop, as a multiple of ``size`` (>= 1).
    normalise
        A key of :data:`NORMALISATIONS`.
    """

    def __init__(
        self, size: int, resize_ratio: float = IMAGENET_RESIZE_RATIO, normalise: str = "imagenet"
    ) -> None:
        if size < 1 or resize_ratio < 1.0:
            raise FedvisionError(
                f"centre crop needs size >= 1 and resize_ratio >= 1, got {size}, {resize_ratio}"
            )
        self.size = size
        self.resize_ratio = resize_ratio
        self.normalise = check_normalise(normalise)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x, single = _to_float_batch(images)
        h, w = x.shape[-2:]
        short = round(self.size * self.resize_ratio)
        # Same output size rule as torchvision's Resize(int): the longer side scales along.
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True)
        # Same offsets as torchvision's center_crop.
        top = round((new_h - self.size) / 2.0)
        left = round((new_w - self.size) / 2.0)
        x = x[..., top : top + self.size, left : left + self.size]
        x = _normalise(x, self.normalise)
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
    normalise
        A key of :data:`NORMALISATIONS`.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.0,
        out_size: int | None = None,
        normalise: str = "imagenet",
    ) -> None:
        self.scale = scale
        self.ratio = ratio
        self.jitter = jitter
        self.out_size = out_size
        self.normalise = check_normalise(normalise)

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
        x = _normalise(x, self.normalise)
        return x[0] if single else x


class PadCropTransform:
    """Per-sample reflect-pad + random crop + horizontal flip: the CIFAR recipe.

    ``RandomCrop(size, padding=4, padding_mode="reflect") + RandomHorizontalFlip()`` with its own
    offsets and flip for every sample of the batch. Crop and flip are one integer gather, so the
    output pixels are exactly input pixels (no interpolation).

    Parameters
    ----------
    padding
        Pixels of reflection added on each side before cropping (< the image side).
    out_size
        Images are first resized to this side length; ``None`` keeps the input size.
    normalise
        A key of :data:`NORMALISATIONS`.
    """

    def __init__(
        self, padding: int = 4, out_size: int | None = None, normalise: str = "imagenet"
    ) -> None:
        self.padding = padding
        self.out_size = out_size
        self.normalise = check_normalise(normalise)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x, single = _to_float_batch(images)
        x = _resize(x, self.out_size)
        b, _, h, w = x.shape
        p = self.padding
        if p >= min(h, w):
            raise FedvisionError(
                f"the cifar preset pads {p} pixels by reflection, which needs images larger "
                f"than {p} px; got {h}x{w}"
            )
        # Drawn on the CPU in a fixed order (x offsets, y offsets, flips): same seed, same crops.
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        cols_in = torch.arange(w)
        cols = ox[:, None] + torch.where(flip[:, None], w - 1 - cols_in, cols_in)
        rows = oy[:, None] + torch.arange(h)
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dev = x.device
        idx_b = torch.arange(b, device=dev)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
        out = padded[idx_b, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
        x = _normalise(out.permute(0, 3, 1, 2).contiguous(), self.normalise)
        return x[0] if single else x


def build_train_transform(
    preset: str, out_size: int | None = None, normalise: str = "imagenet"
) -> ImageTransform:
    """Return the training transform for an augmentation preset.

    Parameters
    ----------
    preset
        One of :data:`PRESETS`: ``none`` (eval transform), ``light`` (flip + random resized
        crop with scale (0.8, 1)), ``standard`` (flip + random resized crop with scale (0.35, 1) +
        brightness/contrast/saturation jitter 0.4), ``cifar`` (reflect-pad 4 + random crop back to
        the image size + flip, for 32 px images).
    out_size
        Output side length; ``None`` keeps the input size.
    normalise
        A key of :data:`NORMALISATIONS`: ``imagenet`` (mean/std) or ``none`` (raw [0, 1]).

    Returns
    -------
    Callable
        ``f(images_uint8, generator=None) -> float32 images``.
    """
    check_normalise(normalise)
    if preset == "none":
        return EvalTransform(out_size, normalise=normalise)
    if preset == "light":
        return TrainTransform(scale=(0.8, 1.0), out_size=out_size, normalise=normalise)
    if preset == "standard":
        return TrainTransform(scale=(0.35, 1.0), jitter=0.4, out_size=out_size, normalise=normalise)
    if preset == "cifar":
        return PadCropTransform(padding=4, out_size=out_size, normalise=normalise)
    raise FedvisionError(
        f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}"
    )


def build_eval_transform(
    out_size: int | None = None, normalise: str = "imagenet"
) -> ImageTransform:
    """Return the evaluation transform (uint8 -> float, optional resize, normalisation).

    Parameters
    ----------
    out_size
        Output side length; ``None`` keeps the input size.
    normalise
        A key of :data:`NORMALISATIONS`.
    """
    return EvalTransform(out_size, normalise=normalise)


def build_center_crop_transform(
    size: int, resize_ratio: float = IMAGENET_RESIZE_RATIO, normalise: str = "imagenet"
) -> ImageTransform:
    """Return the ImageNet-style evaluation transform: resize the shorter side, centre-crop.

    Parameters
    ----------
    size
        Output side length (the crop).
    resize_ratio
        Shorter side before the crop, as a multiple of ``size``; 256/224 is torchvision's.
    normalise
        A key of :data:`NORMALISATIONS`.
    """
    return CenterCropEvalTransform(size, resize_ratio=resize_ratio, normalise=normalise)
