"""Local training and evaluation on a decoded uint8 cache (the work one federated client does).

Batches are gathered by fancy-indexing the (memory-mapped) cache with sorted index batches,
moved to the device and augmented there as a batch; no DataLoader or per-sample Python loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fedvision.data.transforms import (
    NORMALISATIONS,
    PRESETS,
    build_eval_transform,
    build_train_transform,
)
from fedvision.engine.device import resolve_device
from fedvision.engine.objectives import proximal_term
from fedvision.engine.schedule import OPTIMIZERS, make_optimizer, set_lr
from fedvision.errors import FedvisionError
from fedvision.models import set_train_mode, trainable_parameters

BN_MODES: tuple[str, ...] = ("train", "eval")


@dataclass
class TrainConfig:
    """What a client needs to train locally for one round.

    Attributes
    ----------
    epochs
        Local epochs over the client's samples; 0 allowed when ``max_steps`` is set.
    max_steps
        Cap on local optimiser steps (``None`` or 0: no cap); with ``epochs=0`` it alone sets
        the amount of work.
    batch_size, lr, optimizer, momentum, weight_decay
        Optimiser settings; ``optimizer`` is ``sgd`` (with momentum), ``adam`` or ``adamw``
        (decoupled weight decay). A fresh optimiser is built every call, as FedAvg/FedProx
        clients do, unless :func:`train_local` is given the state of a previous call.
    label_smoothing
        Cross-entropy label smoothing in [0, 1).
    proximal_mu
        FedProx coefficient; 0 = plain FedAvg local training.
    augment
        Augmentation preset, one of ``fedvision.data.transforms.PRESETS``.
    normalise
        Input normalisation, a key of ``fedvision.data.transforms.NORMALISATIONS``: ``imagenet``
        (mean/std, what torchvision's weights expect) or ``none`` (raw [0, 1], NIID-Bench).
    seed
        Drives data order, augmentation and dropout of this call.
    amp, channels_last
        bf16 autocast and channels-last memory format; used on CUDA only.
    image_size
        Train at this side length (resizing crops); ``None`` or 0 keeps the cache's size.
    bn_mode
        ``train``: BatchNorm layers normalise with each batch's statistics and update their
        running ones; ``eval``: they normalise with the running statistics, which then stay as
        the global model has them (the pretrained ones), while their scale and shift still train.
    backbone_lr_factor
        The learning rate of every trained parameter outside the classification head is
        ``lr * backbone_lr_factor``; 0 trains the head alone (a head warm-up), 1 is plain
        fine-tuning.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0
    augment: str = "light"
    normalise: str = "imagenet"
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    image_size: int | None = None
    label_smoothing: float = 0.0
    bn_mode: str = "train"
    backbone_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.max_steps == 0:
            self.max_steps = None
        if self.image_size == 0:
            self.image_size = None
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            problems.append("epochs and max_steps must not be negative")
        if self.epochs < 1 and self.max_steps is None:
            problems.append("set epochs >= 1 or max_steps >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(
                f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})"
            )
        if self.momentum < 0 or self.weight_decay < 0 or self.proximal_mu < 0:
            problems.append("momentum, weight_decay and proximal_mu must be >= 0")
        if self.augment not in PRESETS:
            problems.append(f"augment must be one of {', '.join(PRESETS)} (got {self.augment!r})")
        if self.normalise not in NORMALISATIONS:
            problems.append(
                f"normalise must be one of {', '.join(NORMALISATIONS)} (got {self.normalise!r})"
            )
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.image_size is not None and self.image_size < 1:
            problems.append(f"image_size must be >= 1 (got {self.image_size})")
        if self.bn_mode not in BN_MODES:
            problems.append(f"bn_mode must be one of {', '.join(BN_MODES)} (got {self.bn_mode!r})")
        if not 0 <= self.backbone_lr_factor <= 1:
            problems.append(f"backbone_lr_factor must be in [0, 1] (got {self.backbone_lr_factor})")
        if problems:
            raise FedvisionError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_mapping(
        cls,
        d: Mapping[str, Any],
        *,
        strict: bool = False,
        require: Iterable[str] = (),
        **fixed: Any,
    ) -> TrainConfig:
        """Build and validate a config from a mapping (Hydra node, Flower ConfigRecord, dict).

        The one translator from settings to a config: a round's ConfigRecord, the pretraining
        recipe and compression's fine-tune all come through here.

        Parameters
        ----------
        d
            Keys are field names; ``-`` is read as ``_`` (so Flower's ``proximal-mu`` works).
        strict
            Reject keys that are not fields (otherwise they are ignored, since a round's config
            also carries keys meant for others, e.g. ``server-round``).
        require
            Fields that ``d`` must give (a missing one raises instead of taking the default).
        **fixed
            Fields set by the caller whatever ``d`` says (e.g. a seed derived per client).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in d.items():
            key = str(raw_key).replace("-", "_")
            if key not in fields:
                if strict:
                    raise FedvisionError(
                        f"unknown training config key {raw_key!r}; known: {', '.join(fields)}"
                    )
                continue
            kwargs[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        missing = [k for k in require if k not in kwargs]
        if missing:
            raise FedvisionError(
                f"the training settings lack {', '.join(missing)} (were they written by another "
                "fedvision version?)"
            )
        for key, value in fixed.items():
            if key not in fields:
                raise TypeError(f"TrainConfig has no field {key!r}")
            kwargs[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        return cls(**kwargs)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    try:
        if key in ("max_steps", "image_size", "epochs", "batch_size", "seed"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("not a boolean")
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise FedvisionError(
            f"invalid training config value {key}={value!r}: {exc}; expected a "
            f"{type(default).__name__ if default is not None else 'int'}"
        ) from exc


@dataclass
class TrainResult:
    """Outcome of :func:`train_local`.

    ``loss`` is the mean cross-entropy over the samples seen (without the proximal term),
    ``accuracy`` the accuracy on the augmented training batches, ``num_examples`` the size of
    the client's partition (the weight FedAvg uses).
    """

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    samples_seen: int
    seconds: float
    optimizer_state: dict[str, Any] | None = None


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`: mean loss, accuracy, number of samples evaluated."""

    loss: float
    accuracy: float
    num_examples: int


def as_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch device (a name such as ``auto`` is resolved)."""
    return device if isinstance(device, torch.device) else resolve_device(device)


def _resident(model: nn.Module, device: torch.device) -> bool:
    """Whether every tensor of ``model`` is on ``device`` already (a false no only costs a move)."""
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    return all(
        t.device.type == device.type and t.device.index == index
        for t in (*model.parameters(), *model.buffers())
    )


def _split(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut ``order`` into batches, each sorted so the memmap is read front to back."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # A trailing batch of one sample breaks BatchNorm on 1x1 feature maps: fold it into the
    # previous batch (or, for a one-sample client, see the sample twice, differently augmented).
    if len(batches[-1]) == 1:
        if len(batches) > 1:
            batches[-2:] = [np.concatenate(batches[-2:])]
        else:
            batches[-1] = np.repeat(batches[-1], 2)
    return [np.sort(b) for b in batches]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``n`` samples (a trailing batch of one is folded in)."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


def _owned(arr: np.ndarray) -> np.ndarray:
    """Fancy indexing already copies; a slice of a read-only memmap must be copied once."""
    if arr.flags.writeable and arr.flags.c_contiguous:
        return arr
    return np.array(arr)


def load_batch(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's uint8 images and int64 labels on ``device`` (pinned first for CUDA)."""
    x = torch.from_numpy(_owned(images[idx]))
    y = torch.from_numpy(_owned(labels[idx]).astype(np.int64, copy=False))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x, y


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save for ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    cfg: TrainConfig,
    device: torch.device | str,
    *,
    progress: bool = False,
    optimizer_state: dict[str, Any] | None = None,
    keep_optimizer_state: bool = False,
    lr_at: Callable[[int], float] | None = None,
    grad_correction: Sequence[torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on the samples ``indices`` of a decoded cache.

    Parameters
    ----------
    model
        The model holding the global weights; it is moved to ``device`` and trained in place.
    images
        uint8 array ``[N, 3, S, S]`` (usually a read-only ``np.memmap``).
    labels
        int64 array ``[N]``.
    indices
        int64 indices of the samples this client owns.
    cfg
        Local training settings.
    device
        Where to train (a ``torch.device`` or a string for :func:`resolve_device`).
    progress
        Show a tqdm bar over steps on stderr.
    optimizer_state
        A previous call's ``TrainResult.optimizer_state`` to continue from (momentum, Adam
        moments), as centralised training over several calls needs; ``None``: a fresh optimiser.
    keep_optimizer_state
        Return the optimiser's state in the result (a copy on the CPU).
    lr_at
        Learning rate of each step of this call (0-based), e.g.
        :func:`~fedvision.engine.schedule.warmup_cosine_epoch` when centralised training calls
        once per epoch; ``None``: the constant ``cfg.lr`` (federated clients: the server sets
        each round's rate, :func:`~fedvision.engine.schedule.round_lr`).
    grad_correction
        A constant added to the gradient of each trainable parameter (in
        ``trainable_parameters`` order) before every optimiser step; SCAFFOLD's ``c - c_i``
        (Karimireddy et al. 2020). ``None``: no correction.

    Returns
    -------
    TrainResult
    """
    device = as_device(device)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise FedvisionError(
            "train_local got no samples (empty indices); this client's partition is empty, "
            "repartition with fewer clients or a larger Dirichlet alpha"
        )
    n = len(indices)
    on_cuda = device.type == "cuda"
    amp = cfg.amp and on_cuda
    channels_last = cfg.channels_last and on_cuda
    transform = build_train_transform(cfg.augment, cfg.image_size, cfg.normalise)

    # A cohort worker's model stays on its device: Module.to walks every module each call, a
    # fortieth of a cross-device client's time (scripts/bench_train_local.py).
    if not _resident(model, device):
        model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    set_train_mode(model, bn_eval=cfg.bn_mode == "eval")
    params = trainable_parameters(model)
    if not params:
        raise FedvisionError("the model has no trainable parameters; check the finetune mode")
    corrections = _corrections(params, grad_correction, device)
    use_prox = cfg.proximal_mu > 0
    global_params = [p.detach().clone() for p in params] if use_prox else []
    optimizer = make_optimizer(model, params, cfg)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as exc:
            raise FedvisionError(
                f"the saved optimiser state does not fit this model/optimiser ({exc}); "
                "was it saved with another optimizer or finetune mode?"
            ) from exc

    total = steps_per_epoch(n, cfg.batch_size) * cfg.epochs if cfg.epochs >= 1 else math.inf
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    total = int(total)

    # One CPU generator drives order and augmentation; fork_rng confines dropout's use of the
    # global RNG to this call, so a seed reproduces a call without side effects elsewhere.
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = step = 0
    start = time.perf_counter()
    with (
        torch.random.fork_rng(devices=rng_devices(device)),
        tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False) as bar,
    ):
        if device.type == "cuda":
            torch.manual_seed(cfg.seed)
        else:
            # The same CPU stream as torch.manual_seed, without the lazy seed it queues for
            # every accelerator backend, a stack trace each: 2 ms a call, a fifth of a
            # cross-device client's whole time (scripts/bench_cross_device.py).
            torch.default_generator.manual_seed(cfg.seed)
        while step < total:
            order = indices[torch.randperm(n, generator=gen).numpy()]
            for idx in _split(order, cfg.batch_size):
                if step >= total:
                    break
                x, y = load_batch(images, labels, idx, device)
                x = transform(x, generator=gen)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # Entering a disabled autocast each step costs as much as a small layer does.
                with (
                    torch.autocast(device.type, dtype=torch.bfloat16)
                    if amp
                    else contextlib.nullcontext()
                ):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                objective = (
                    loss + proximal_term(params, global_params, cfg.proximal_mu)
                    if use_prox
                    else loss
                )
                if lr_at is not None:
                    set_lr(optimizer.param_groups, lr_at(step))
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if corrections is not None:
                    _correct(params, corrections)
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(idx)
                step += 1
                bar.update(1)
        mean_loss = loss_sum.item() / seen
        accuracy = correct.item() / seen
    return TrainResult(
        loss=mean_loss,
        accuracy=accuracy,
        num_examples=n,
        steps=step,
        samples_seen=seen,
        seconds=time.perf_counter() - start,
        optimizer_state=_cpu_state(optimizer.state_dict()) if keep_optimizer_state else None,
    )


def _corrections(
    params: Sequence[nn.Parameter], correction: Sequence[torch.Tensor] | None, device: torch.device
) -> list[torch.Tensor] | None:
    """``correction`` checked against ``params`` and moved to ``device`` once, not every step."""
    if correction is None:
        return None
    if len(correction) != len(params) or any(
        c.shape != p.shape for c, p in zip(correction, params, strict=True)
    ):
        raise ValueError(
            f"grad_correction has {len(correction)} tensors; it needs one per trainable "
            f"parameter ({len(params)}), each of that parameter's shape"
        )
    return [
        c.detach().to(device=device, dtype=p.dtype) for c, p in zip(correction, params, strict=True)
    ]


def _correct(params: Sequence[nn.Parameter], corrections: Sequence[torch.Tensor]) -> None:
    for p, c in zip(params, corrections, strict=True):
        # A parameter the loss did not reach still gets the correction: its corrected
        # gradient is 0 + c.
        if p.grad is None:
            p.grad = c.clone()
        else:
            p.grad.add_(c)


def _cpu_state(state: Any) -> Any:
    """A deep copy of an optimiser state dict with every tensor on the CPU (checkpointable)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_state(v) for v in state)
    return state


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str,
    image_size: int | None = None,
    normalise: str = "imagenet",
    amp: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (eval mode, no augmentation) on samples of a decoded cache.

    Parameters
    ----------
    model
        The model to evaluate; it is moved to ``device``.
    images, labels
        The decoded cache (uint8 ``[N, 3, S, S]``) and its int64 labels.
    indices
        Samples to evaluate; ``None`` evaluates all. Empty gives ``num_examples=0``.
    batch_size
        Evaluation batch size.
    device
        Where to evaluate.
    image_size
        Resize to this side length; ``None`` keeps the cache's size.
    normalise
        Input normalisation (as the model trained with, :class:`TrainConfig`'s ``normalise``).
    amp
        bf16 autocast on CUDA.
    progress
        Show a tqdm bar on stderr.

    Returns
    -------
    EvalResult
        Mean cross-entropy, accuracy and the number of samples.
    """
    device = as_device(device)
    if batch_size < 1:
        raise FedvisionError(f"evaluation batch_size must be >= 1 (got {batch_size})")
    if indices is None:
        n = len(labels)
        batches: list[Any] = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    else:
        order = np.sort(np.asarray(indices, dtype=np.int64))
        n = len(order)
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if n == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
    transform = build_eval_transform(image_size, normalise)
    model.to(device).eval()
    amp = amp and device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
            x, y = load_batch(images, labels, idx, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(transform(x))
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    return EvalResult(loss=loss_sum.item() / n, accuracy=correct.item() / n, num_examples=n)
