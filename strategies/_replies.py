"""Reading train replies for strategies that need more than one weighted mean (SCAFFOLD, FedNova).

Flower's ``FedAvg.aggregate_train`` sums every ArrayRecord of a reply into one average, so a reply
that carries a second record (SCAFFOLD's control-variate update) cannot go through it; these
helpers check what such a strategy reads and say in one line what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedvision import constants as C
from fedvision.errors import FedvisionError


def ok_replies(replies: Iterable[Message]) -> list[Message]:
    """The replies that carry content (error replies are left out, as Flower's strategies do)."""
    return [m for m in replies if not m.has_error()]


def arrays_like(msg: Message, key: str, like: ArrayRecord, who: str) -> dict[str, np.ndarray]:
    """``msg``'s ArrayRecord ``key`` in float64, checked against ``like``'s keys and shapes."""
    record = msg.content.array_records.get(key)
    if record is None:
        raise FedvisionError(
            f"{who}: a train reply lacks the array record {key!r}; the client runs another "
            "fedvision version or another ClientApp"
        )
    if list(record.keys()) != list(like.keys()) or any(
        tuple(record[k].shape) != tuple(like[k].shape) for k in like
    ):
        raise FedvisionError(
            f"{who}: a reply's {key!r} does not fit the global model ({len(record)} arrays, "
            f"{len(like)} expected, or other shapes): client and server run different models"
        )
    return {k: np.asarray(record[k].numpy(), dtype=np.float64) for k in like}


def metric(msg: Message, key: str, who: str) -> float:
    """The number ``key`` of a reply's metrics record."""
    metrics = msg.content.metric_records.get(C.KEY_METRICS)
    if metrics is None or key not in metrics:
        raise FedvisionError(
            f"{who}: a train reply lacks the metric {key!r}; the client runs another fedvision "
            "version or another ClientApp"
        )
    return float(metrics[key])


def as_record(arrays: dict[str, np.ndarray], like: ArrayRecord) -> ArrayRecord:
    """``arrays`` in ``like``'s order and dtypes (in fedvision float32: what travels)."""
    return ArrayRecord(
        {k: Array(np.asarray(arrays[k]).astype(like[k].numpy().dtype)) for k in like}
    )
