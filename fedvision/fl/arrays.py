"""Model weights as they travel in Flower messages: one float32 ArrayRecord.

Flower's strategies do float arithmetic on every array they aggregate. Sent as is, BatchNorm's
integer ``num_batches_tracked`` makes QFedAvg fail (in-place float maths on an int array), and
FedAdam/FedYogi/FedAdagrad return float64 arrays, which doubles every later download. Sending and
keeping every array as float32 avoids both; ``load_state_dict`` casts the counter back to int.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def float32_arrays(weights: Mapping[str, torch.Tensor] | ArrayRecord) -> ArrayRecord:
    """An ArrayRecord of ``weights`` (a torch state dict or an ArrayRecord), all in float32."""
    if isinstance(weights, ArrayRecord):
        items = ((k, a.numpy()) for k, a in weights.items())
    else:
        items = ((k, t.detach().cpu().numpy()) for k, t in weights.items())
    # astype keeps 0-d arrays 0-d (ascontiguousarray would make BatchNorm's counter 1-d, and a
    # checkpoint then no longer fits the model it came from).
    return ArrayRecord({k: Array(np.asarray(v).astype(np.float32, copy=False)) for k, v in items})
