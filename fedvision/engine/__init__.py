"""Engine layer: local training, evaluation and objectives (never imports flwr)."""

from fedvision.engine.device import resolve_device
from fedvision.engine.objectives import proximal_term, snapshot_params
from fedvision.engine.train import (
    OPTIMIZERS,
    EvalResult,
    TrainConfig,
    TrainResult,
    evaluate,
    steps_per_epoch,
    train_local,
    warmup_cosine,
)

__all__ = [
    "OPTIMIZERS",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "proximal_term",
    "resolve_device",
    "snapshot_params",
    "steps_per_epoch",
    "train_local",
    "warmup_cosine",
]
