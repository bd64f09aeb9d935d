"""Learning rates and optimisers: the one home of every schedule and of optimiser construction.

Federated clients, pretraining and compression's fine-tune all train through
:func:`~fedvision.engine.train.train_local`, which builds its optimiser here; what differs is the
schedule:

- federated runs change the rate once per round (:func:`round_lr`, computed by the server and
  sent in the round's config, so a client trains each round at one constant rate);
- pretraining changes it every step (:func:`warmup_cosine`), one epoch's slice per
  ``train_local`` call (:func:`warmup_cosine_epoch`);
- compression's fine-tune trains at one constant rate.

Every parameter group carries an ``lr_factor`` (the backbone's share of the rate), so a per-step
schedule scales the head and the backbone alike (:func:`set_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models import find_head


class OptimizerSettings(Protocol):
    """What building an optimiser reads of a ``fedvision.engine.train.TrainConfig`` (which
    imports this module: the protocol keeps the import one way)."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    backbone_lr_factor: float


OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")


def round_lr(client: Mapping[str, Any], server_round: int, num_rounds: int) -> float:
    """Learning rate for a round under the configured schedule over ``num_rounds`` rounds.

    ``client`` is the experiment's ``client`` group (``lr``, ``lr_schedule``, ``lr_min_factor``,
    ``lr_step_rounds``, ``lr_gamma``). ``cosine`` decays from ``lr`` (round 1) to
    ``lr * lr_min_factor`` (round ``num_rounds``) and stays there after it; ``step`` multiplies
    by ``lr_gamma`` every ``lr_step_rounds`` rounds.
    """
    lr = float(client["lr"])
    schedule = client.get("lr_schedule", "constant")
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        low = lr * float(client.get("lr_min_factor", 0.0))
        progress = 0.0 if num_rounds <= 1 else min(1.0, (server_round - 1) / (num_rounds - 1))
        return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        steps = (server_round - 1) // max(1, int(client.get("lr_step_rounds", 10)))
        return lr * float(client.get("lr_gamma", 0.5)) ** steps
    raise FedvisionError(
        f"client.lr_schedule={schedule!r} is unknown; use one of {', '.join(LR_SCHEDULES)}"
    )


def warmup_cosine(step: int, total: int, warmup: int, lr: float, lr_min: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine.

    The warm-up ramps from ``lr / (warmup + 1)`` to ``lr``; the cosine then falls from ``lr`` to
    ``lr_min`` at the last step (``total - 1``), the usual recipe for training from scratch.
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    t = min((step - warmup) / max(total - warmup - 1, 1), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t))


def warmup_cosine_epoch(
    epoch: int, steps: int, epochs: int, warmup_epochs: float, lr: float, lr_min: float
) -> Callable[[int], float]:
    """Epoch ``epoch``'s slice of :func:`warmup_cosine` over ``epochs`` epochs of ``steps`` steps.

    The result maps a step within the epoch (0-based) to its rate: ``train_local``'s ``lr_at``
    when a run trains one epoch per call. ``warmup_epochs`` may be fractional (rounded to steps).
    """
    total, warmup = epochs * steps, round(warmup_epochs * steps)
    return lambda s: warmup_cosine(epoch * steps + s, total, warmup, lr, lr_min)


def param_groups(
    model: nn.Module, params: list[nn.Parameter], cfg: OptimizerSettings
) -> list[dict[str, Any]]:
    """One group per learning-rate factor: the head at ``lr``, the rest at the backbone's factor.

    Each group keeps its ``lr_factor`` so that a per-step schedule (:func:`set_lr`) scales both.
    """
    if cfg.backbone_lr_factor == 1:
        return [{"params": params, "lr": cfg.lr, "lr_factor": 1.0}]
    head = {id(p) for p in find_head(model)[1].parameters()}
    factor = cfg.backbone_lr_factor
    groups = [
        {"params": [p for p in params if id(p) in head], "lr": cfg.lr, "lr_factor": 1.0},
        {"params": [p for p in params if id(p) not in head], "lr": cfg.lr * factor,
         "lr_factor": factor},
    ]  # fmt: skip
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, params: list[nn.Parameter], cfg: OptimizerSettings
) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names over ``params`` (the trainable parameters of ``model``).

    ``sgd`` has momentum and coupled weight decay, ``adamw`` decoupled weight decay; the head and
    the backbone get their own groups when ``cfg.backbone_lr_factor`` is not 1.
    """
    groups = param_groups(model, params, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(groups: Sequence[dict[str, Any]], lr: float) -> None:
    """Set a step's rate: ``lr`` times each group's ``lr_factor`` (see :func:`param_groups`)."""
    for group in groups:
        group["lr"] = lr * group["lr_factor"]
