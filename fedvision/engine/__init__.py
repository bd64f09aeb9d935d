"""Engine layer: local training, evaluation, objectives and schedules (never imports flwr)."""

from fedvision.engine.device import resolve_device
from fedvision.engine.objectives import proximal_term, snapshot_params
from fedvision.engine.schedule import (
    LR_SCHEDULES,
    OPTIMIZERS,
    make_optimizer,
    round_lr,
    warmup_cosine,
    warmup_cosine_epoch,
)
from fedvision.engine.train import (
    EvalResult,
    TrainConfig,
    TrainResult,
    evaluate,
    steps_per_epoch,
    train_local,
)

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "make_optimizer",
    "proximal_term",
    "resolve_device",
    "round_lr",
    "snapshot_params",
    "steps_per_epoch",
    "train_local",
    "warmup_cosine",
    "warmup_cosine_epoch",
]
