"""The SecAgg+ ClientApp (``fedvision.fl.secagg_clientapp:app``), chosen by ``secagg=secaggplus``.

A Message-API app like ``fedvision.fl.clientapp``, whose query handler it shares (the round loop
asks each node which partition it holds). Its train handler runs behind Flower 1.39's
``secaggplus_mod``, which reads the reply in the legacy ``FitRes`` layout, so it trains with the
same engine calls and node settings as ``fedvision.fl.clientapp`` (no training loop here) and
replies in that layout. It replies with its *update*, new weights minus the received ones, in
float64: the mod multiplies by the client's weight and quantises it, and float32 would round
values near ``Q = 2^22`` to half a quantisation step.
"""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fedvision import constants as C
from fedvision.engine import train_local
from fedvision.fl.arrays import float32_arrays
from fedvision.fl.clientapp import client_indices, load_global, node_settings, query
from fedvision.fl.parts import travelling
from fedvision.fl.round_config import to_train_config


def clipped_values(update: np.ndarray, weight: int, max_weight: float, clipping: float) -> int:
    """How many values of ``weight / max_weight * update`` SecAgg+ will clip to +-``clipping``."""
    return int(np.count_nonzero(np.abs(update * (weight / max_weight)) > clipping))


def fit(
    context: Context, parameters: NDArrays, config: dict[str, Scalar]
) -> tuple[NDArrays, int, dict[str, Scalar]]:
    """Train on this node's partition; return the update, its example count, metrics."""
    node = node_settings(context)
    # The parameters, then (when BatchNorm layers train) their statistics: see travelling().
    received = [
        ArrayRecord({C.KEY_FLAT: Array(np.asarray(a, dtype=np.float32))}) for a in parameters
    ]
    stats = received[1] if len(received) > 1 else None
    # No state between rounds: SecAgg+ runs FedAvg without FedBN (fedvision.fl.secagg).
    model, parts, _ = load_global(config, received[0], node, context.state, stats=stats)
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


app = ClientApp()
app.query()(query)  # which partition this node holds, and that its data opens


@app.train(mods=[secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """One SecAgg+ train message: the mod runs the protocol, this trains when it asks."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    updates, n, metrics = fit(context, parameters_to_ndarrays(ins.parameters), ins.config)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(updates), n, metrics)
    return Message(content=compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
