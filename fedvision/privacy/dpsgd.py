"""Sample-level differential privacy inside one client: DP-SGD with Opacus (Abadi et al. 2016).

Each step clips every sample's gradient to ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to their sum (Opacus' ``GradSampleModule`` + ``DPOptimizer``);
:func:`fedvision.privacy.accounting.rdp_epsilon` (Opacus' RDP accountant, the one client-level DP
uses) turns the steps into epsilon at ``delta`` for this client's own data.

This is the engine side of privacy: it trains in one process and never imports flwr, so the
ClientApp calls it as it calls :func:`fedvision.engine.train_local`.

Batches are Poisson-sampled (each sample joins a step with probability ``batch_size / n``): that is
the sampling the RDP analysis assumes, so the reported epsilon holds for the batches drawn here.

BatchNorm is frozen, not replaced: its affine parameters stop training and its running statistics
stay those of the global model the client received (eval mode). A frozen BatchNorm is a fixed
per-sample affine map, so no sample's output depends on the others in its batch and per-sample
gradients exist; the pretrained statistics that fine-tuning starts from are kept, where Opacus'
``ModuleValidator.fix`` (BatchNorm -> GroupNorm) would change the architecture on the server and
every client and discard them. A model given to :func:`train_local_dpsgd` that already uses
GroupNorm (``ModuleValidator.fix``) trains as it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedvision.data.transforms import build_train_transform
from fedvision.engine.schedule import make_optimizer
from fedvision.engine.train import (
    TrainConfig,
    TrainResult,
    as_device,
    load_batch,
    rng_devices,
    steps_per_epoch,
)
from fedvision.errors import FedvisionError
from fedvision.models import set_train_mode, trainable_parameters
from fedvision.privacy.accounting import rdp_epsilon

_BATCHNORM = nn.modules.batchnorm._BatchNorm
# Opacus is imported inside the functions that use it: importing it loads torch.distributed and
# scipy (seconds on a small machine), which every server and client without DP-SGD would pay.


@dataclass(frozen=True)
class DPSGDConfig:
    """Sample-level DP-SGD settings of one client.

    Attributes
    ----------
    noise_multiplier : std of the noise on each step's summed gradients, in units of
        ``max_grad_norm`` (> 0).
    max_grad_norm : per-sample gradient clipping norm (> 0).
    delta : the delta at which epsilon is reported, in (0, 1).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        check_dpsgd(self.noise_multiplier, self.max_grad_norm, self.delta)


def check_dpsgd(noise_multiplier: float, max_grad_norm: float, delta: float) -> None:
    """Refuse DP-SGD settings that give no guarantee or cannot run (one line each)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise FedvisionError(
            f"privacy.dpsgd.noise_multiplier={noise_multiplier} must be > 0 (DP-SGD without "
            "noise guarantees nothing)"
        )
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise FedvisionError(f"privacy.dpsgd.max_grad_norm={max_grad_norm} must be > 0")
    if not 0 < delta < 1:
        raise FedvisionError(f"privacy.delta={delta} must lie in (0, 1)")


@dataclass
class DPSGDResult(TrainResult):
    """:class:`TrainResult` plus the privacy this client spent on its own data.

    ``epsilon`` covers ``total_steps`` (this call's steps plus ``prior_steps``) at ``delta``.
    """

    epsilon: float = math.inf
    total_steps: int = 0
    sample_rate: float = 0.0


def freeze_batchnorm(model: nn.Module) -> list[nn.Parameter]:
    """Stop every BatchNorm layer's training; return the parameters it unfroze from (to restore).

    :func:`~fedvision.models.set_train_mode` then keeps those layers in eval mode, so their running
    statistics stay as received.
    """
    frozen = []
    for m in model.modules():
        if isinstance(m, _BATCHNORM):
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
    return frozen


def disable_inplace(model: nn.Module) -> list[nn.Module]:
    """Make in-place activations out-of-place; return the modules changed (to restore).

    Opacus' backward hooks hand on views that an in-place activation (torchvision's
    ``ReLU(inplace=True)``, ``Hardswish(inplace=True)``) would overwrite, which autograd refuses.
    """
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    return changed


def check_dpsgd_model(model: nn.Module) -> None:
    """Refuse, in one line, a model Opacus cannot train even with its BatchNorm frozen.

    The model is left as it was.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    frozen = freeze_batchnorm(model)
    try:
        errors = ModuleValidator.validate(model, strict=False)
        errors += GradSampleModule.validate(model, strict=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if errors:
        first = str(errors[0]).strip().splitlines()[0][:160]
        raise FedvisionError(
            f"DP-SGD cannot train {type(model).__name__} with its BatchNorm frozen: {first} "
            f"({len(errors)} problem(s)); pick another model or privacy=none"
        )


def train_local_dpsgd(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    cfg: TrainConfig,
    dp: DPSGDConfig,
    device: torch.device | str,
    *,
    prior_steps: int = 0,
) -> DPSGDResult:
    """Train ``model`` in place with DP-SGD on the samples ``indices`` of a decoded cache.

    Parameters
    ----------
    model, images, labels, indices, cfg, device
        As for :func:`~fedvision.engine.train_local`. ``cfg.batch_size`` is the *expected*
        batch size (Poisson sampling); the number of steps is ``cfg.max_steps`` if set, else
        ``cfg.epochs`` times the steps of one epoch. ``proximal_mu`` must be 0 (the proximal
        term's gradient is not per-sample; Opacus would drop it).
    dp
        Noise multiplier, per-sample clipping norm, delta.
    prior_steps
        DP-SGD steps this client already took on the same data in earlier rounds: the reported
        epsilon composes them with this call's.

    Returns
    -------
    DPSGDResult
    """
    device = as_device(device)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise FedvisionError("train_local_dpsgd got no samples (empty indices)")
    if cfg.proximal_mu > 0:
        raise FedvisionError(
            "DP-SGD clips per-sample gradients, and the proximal term has none: use "
            "strategy=fedavg with privacy=dpsgd"
        )
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_dpsgd_model(model)
    sample_rate = min(1.0, cfg.batch_size / n)
    total = steps_per_epoch(n, cfg.batch_size) * cfg.epochs if cfg.epochs >= 1 else math.inf
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    total = int(total)
    transform = build_train_transform(cfg.augment, cfg.image_size, cfg.normalise)

    model.to(device)
    frozen = freeze_batchnorm(model)
    inplace = disable_inplace(model)
    gsm = None
    try:
        set_train_mode(model)  # frozen BatchNorm stays in eval mode: statistics as received
        params = trainable_parameters(model)
        if not params:
            raise FedvisionError("the model has no trainable parameters outside BatchNorm")
        gsm = GradSampleModule(model)
        optimizer = DPOptimizer(
            make_optimizer(model, params, cfg),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=cfg.batch_size,
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        with torch.random.fork_rng(devices=rng_devices(device)):
            torch.manual_seed(cfg.seed)  # Opacus draws its noise from the global generator
            for _ in range(total):
                take = torch.rand(n, generator=gen).numpy() < sample_rate
                idx = np.sort(indices[take])
                if idx.size == 0:
                    # An empty Poisson batch: skipping it releases less than the accountant
                    # counts, so the reported epsilon still bounds what was released.
                    continue
                x, y = load_batch(images, labels, idx, device)
                logits = gsm(transform(x, generator=gen))
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(idx)
        seconds = time.perf_counter() - start
    finally:
        if gsm is not None:
            gsm.cleanup()  # removes the hooks and per-sample buffers: the cached model stays plain
        for p in frozen:
            p.requires_grad_(True)
        for m in inplace:
            m.inplace = True
    steps = prior_steps + total
    return DPSGDResult(
        loss=loss_sum / max(seen, 1),
        accuracy=correct / max(seen, 1),
        num_examples=n,
        steps=total,
        samples_seen=seen,
        seconds=seconds,
        epsilon=rdp_epsilon([dp.noise_multiplier] * int(steps), sample_rate, dp.delta),
        total_steps=steps,
        sample_rate=sample_rate,
    )
