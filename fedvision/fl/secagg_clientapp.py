"""The SecAgg+ ClientApp (``fedvision.fl.secagg_clientapp:app``), chosen by ``secagg=secaggplus``.

Flower 1.39's ``secaggplus_mod`` reads the reply in the legacy ``FitRes`` layout, so this client is
a ``NumPyClient``; it trains and evaluates with the same engine calls and node settings as
``fedvision.fl.clientapp`` (no training loop here). It replies with its *update*, new weights minus
the received ones, in float64: the mod multiplies by the client's weight and quantises it, and
float32 would round values near ``Q = 2^22`` to half a quantisation step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import NDArrays, Scalar

from fedvision import constants as C
from fedvision.engine import evaluate, train_local
from fedvision.fl.arrays import float32_arrays
from fedvision.fl.clientapp import client_indices, load_global, node_settings
from fedvision.fl.parts import travelling
from fedvision.fl.round_config import to_train_config


def clipped_values(update: np.ndarray, weight: int, max_weight: float, clipping: float) -> int:
    """How many values of ``weight / max_weight * update`` SecAgg+ will clip to +-``clipping``."""
    return int(np.count_nonzero(np.abs(update * (weight / max_weight)) > clipping))


class SecAggClient(NumPyClient):
    """One fedvision client in the legacy shape that ``secaggplus_mod`` wraps."""

    def __init__(self, context: Context) -> None:
        self.node_context = context

    def _model(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[Any, Any, Any]:
        node = node_settings(self.node_context)
        # The parameters, then (when BatchNorm layers train) their statistics: see travelling().
        received = [
            ArrayRecord({C.KEY_FLAT: Array(np.asarray(a, dtype=np.float32))}) for a in parameters
        ]
        stats = received[1] if len(received) > 1 else None
        model, parts, _ = load_global(config, received[0], node, self.node_context, stats=stats)
        return node, model, parts

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Say which partition this node holds: the server samples by partition id, seeded."""
        return {C.KEY_PARTITION_ID: int(node_settings(self.node_context)[C.KEY_PARTITION_ID])}

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on this client's partition; return the update, its example count, metrics."""
        node, model, parts = self._model(parameters, config)
        cache, train_idx, _ = client_indices(node)
        pid = int(node[C.KEY_PARTITION_ID])
        device = next(model.parameters()).device
        result = train_local(
            model, cache.images, cache.labels, train_idx, to_train_config(config, pid), device
        )
        new = travelling(float32_arrays(model.state_dict()), parts)
        updates = [
            a.astype(np.float64) - np.asarray(b, dtype=np.float64)
            for a, b in zip(new, parameters, strict=True)
        ]
        n = int(result.num_examples)
        metrics: dict[str, Scalar] = {
            C.KEY_PARTITION_ID: pid,
            C.KEY_TRAIN_LOSS: float(result.loss),
            C.KEY_TRAIN_ACC: float(result.accuracy),
            C.KEY_TRAIN_SECONDS: float(result.seconds),
            C.KEY_SECAGG_CLIPPED: sum(
                clipped_values(
                    u, n, float(config[C.KEY_SECAGG_MAX_WEIGHT]), float(config[C.KEY_SECAGG_CLIP])
                )
                for u in updates
            ),
        }
        return updates, n, metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the received global model on this client's local validation part."""
        node, model, _ = self._model(parameters, config)
        cache, _, val_idx = client_indices(node)
        res = evaluate(
            model, cache.images, cache.labels, val_idx, device=next(model.parameters()).device,
            normalise=str(config.get(C.KEY_NORMALISE, "imagenet")),
        )  # fmt: skip
        return float(res.loss), int(res.num_examples), {C.KEY_VAL_ACC: float(res.accuracy)}


def client_fn(context: Context) -> Client:
    """A fresh client for each message; the mod's protocol state lives in ``context.state``."""
    return SecAggClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
