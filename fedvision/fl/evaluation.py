"""Evaluating the global model: centrally (server's validation part, test split), on the clients,
and which validation metric selects the best round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvision import constants as C
from fedvision.config import model_normalise
from fedvision.data.cache import DecodedCache
from fedvision.engine import evaluate, resolve_device
from fedvision.fl.directory import exchange
from fedvision.fl.parts import local_bn, with_stats
from fedvision.models import build_model
from fedvision.rundir import RunPlan


class CentralEvaluator:
    """Evaluates the global model on the server's validation part and on the test split."""

    def __init__(self, cfg: Mapping[str, Any], plan: RunPlan) -> None:
        self.device = resolve_device(str(cfg["device"]))
        self.batch_size = int(cfg["eval_batch_size"])
        self.normalise = model_normalise(cfg)
        self.model = build_model(str(cfg["model"]["name"]), plan.num_classes).to(self.device)
        self.test = DecodedCache.open(plan.test_cache)
        self.train = DecodedCache.open(plan.train_cache)
        self.val_idx = None if plan.server_val_file is None else np.load(plan.server_val_file)

    def _eval(self, cache: DecodedCache, idx: np.ndarray | None) -> tuple[float, float]:
        res = evaluate(
            self.model, cache.images, cache.labels, idx, batch_size=self.batch_size,
            device=self.device, normalise=self.normalise,
        )  # fmt: skip
        return float(res.accuracy), float(res.loss)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Accuracy and loss on validation (when held) and test, as a metrics record."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        out: dict[str, float] = {}
        if self.val_idx is not None:
            out["val_accuracy"], out["val_loss"] = self._eval(self.train, self.val_idx)
        out["test_accuracy"], out["test_loss"] = self._eval(self.test, None)
        return out


def selection_key(cfg: Mapping[str, Any], plan: RunPlan) -> str | None:
    """Which validation metric picks the best round: the server's part, else the clients'.

    Under FedBN the clients' own models (shared weights + their BatchNorm) are the models in use;
    the global model's BatchNorm is the initial one, so only the clients' validation can select.
    """
    if local_bn(cfg):
        return "client_val_accuracy"
    if plan.server_val_file is not None:
        return "val_accuracy"
    if float(cfg["strategy"].get("fraction_evaluate", 0.0)) > 0:
        return "client_val_accuracy"
    return None


def federated_evaluate(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    stats: ArrayRecord | None,
    config: ConfigRecord,
    rnd: int,
    timeout: float,
) -> dict[str, Any]:
    """Clients evaluate the global model on their local validation parts (when configured).

    Under FedBN each client evaluates its own model: the shared weights with its BatchNorm.
    """
    messages = with_stats(strategy.configure_evaluate(rnd, arrays, config, grid), stats)
    if not messages:
        return {}
    replies = [
        m
        for m in exchange(grid, messages, timeout)
        # A client whose validation part is empty has nothing to say (and a zero weight would
        # divide by zero if every sampled client were such a client).
        if m.has_error() or m.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES] > 0
    ]
    metrics = strategy.aggregate_evaluate(rnd, replies)
    if metrics is None:
        return {"client_val_accuracy": None, "client_val_loss": None}
    return {
        "client_val_accuracy": metrics.get(C.KEY_VAL_ACC),
        "client_val_loss": metrics.get(C.KEY_VAL_LOSS),
    }
