"""What travels in a round: the trained parts of the model, cut out of and merged into the whole.

The server owns the whole global model (checkpoints, central evaluation). Each round it hands the
strategy only the ``shared`` entries of :class:`~fedvision.models.ModelParts` (the parameters
that train, minus FedBN's local BatchNorm), so every Flower strategy aggregates parameters and
nothing else, and merges the aggregate back. BatchNorm running statistics of the layers that
train travel beside them as a second packed record (``C.KEY_BN_STATS``), which the server takes
out of the replies before the strategy sees them (Flower's strategies accept exactly one
ArrayRecord per reply) and averages by example count. Counters never travel. Clients complete the
model from the run's initial weights, checked by a fingerprint of everything that is never sent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn
from tqdm import tqdm

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import float32_arrays, pack, unpack
from fedvision.fl.feature import Feature
from fedvision.models import ModelParts, batchnorm_keys, build_model, fingerprint, split_parts


def local_bn(cfg: Mapping[str, Any]) -> bool:
    """Whether the run uses FedBN (``client.local_bn``)."""
    return bool(cfg["client"].get("local_bn", False))


def run_model(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The run's model as configured (architecture, fine-tune mode), with fresh weights."""
    model = cfg["model"]
    return build_model(
        str(model["name"]),
        num_classes,
        finetune=str(model.get("finetune", "full")),
        last_k=int(model.get("last_k", 1)),
    )


def run_parts(cfg: Mapping[str, Any], num_classes: int) -> ModelParts:
    """The split of the run's model (architecture, fine-tune mode, FedBN, BN mode) into parts."""
    bn_eval = str(cfg["client"].get("bn_mode", "train")) == "eval"
    return split_parts(run_model(cfg, num_classes), local_bn=local_bn(cfg), bn_eval=bn_eval)


def subset(arrays: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    """The entries ``keys`` of ``arrays`` (the same record when that is all of them)."""
    keys = list(keys)
    if keys == list(arrays.keys()):
        return arrays
    return ArrayRecord({k: arrays[k] for k in keys})


def packed_stats(arrays: ArrayRecord, parts: ModelParts) -> ArrayRecord | None:
    """The packed BatchNorm statistics of ``arrays`` that travel (``None``: the model has none)."""
    return pack(subset(arrays, parts.stats)) if parts.stats else None


def travelling(arrays: ArrayRecord, parts: ModelParts) -> list[np.ndarray]:
    """The packed parameters, then the packed BatchNorm statistics when some train (SecAgg+
    sends both as masked arrays of its legacy parameter list)."""
    return [
        pack(subset(arrays, keys))[C.KEY_FLAT].numpy()
        for keys in (parts.shared, parts.stats)
        if keys
    ]


def with_stats(messages: Iterable[Message], stats: ArrayRecord | None) -> list[Message]:
    """``messages`` with the global BatchNorm statistics beside the strategy's parameters."""
    messages = list(messages)
    if stats is None:
        return messages
    for m in messages:
        # Strategies send every node the same RecordDict: each message gets its own (the arrays
        # are shared, not copied), so a later per-client change touches one message only.
        m.content = RecordDict({**dict(m.content.items()), C.KEY_BN_STATS: stats})
    return messages


def take_stats(replies: Iterable[Message]) -> list[tuple[ArrayRecord, float]]:
    """Take the BatchNorm statistics out of train replies; return them with example counts.

    Flower's strategies refuse a reply with more than one ArrayRecord, and statistics must never
    reach them (no clipping, noise or server step), so they leave the reply here. The weight is
    the client's real example count (``num-train``): under client-level DP ``num-examples`` is 1.
    """
    out = []
    for m in replies:
        if m.has_error() or C.KEY_BN_STATS not in m.content.array_records:
            continue
        content = dict(m.content.items())
        stats = content.pop(C.KEY_BN_STATS)
        m.content = RecordDict(content)
        metrics = m.content[C.KEY_METRICS]
        out.append((stats, float(metrics.get(C.KEY_NUM_TRAIN, metrics[C.KEY_NUM_EXAMPLES]))))
    return out


def mean_stats(stats: Iterable[tuple[ArrayRecord, float]]) -> ArrayRecord | None:
    """Example-weighted mean of packed statistics (``None`` when there are none).

    Flower's own weighted mean (the one FedAvg runs), so plain FedAvg gives the numbers it gave
    when statistics travelled inside the strategy's record.
    """
    records = [
        RecordDict({"stats": rec, "weight": MetricRecord({"w": w})}) for rec, w in stats if w > 0
    ]
    return aggregate_arrayrecords(records, "w") if records else None


def apply_aggregate(
    arrays: ArrayRecord,
    params: ArrayRecord | None,
    client_stats: Iterable[tuple[ArrayRecord, float]],
    layouts: tuple[Mapping[str, tuple[int, ...]], Mapping[str, tuple[int, ...]]],
) -> ArrayRecord:
    """The global model after a round: the strategy's packed ``params`` and the clients' mean
    BatchNorm statistics merged into ``arrays`` (``arrays`` itself when ``params`` is None)."""
    if params is None:
        return arrays
    arrays = merge(arrays, unpack(float32_arrays(params), layouts[0]))
    if (mean := mean_stats(client_stats)) is not None:
        arrays = merge(arrays, unpack(mean, layouts[1]))
    return arrays


def merge(whole: ArrayRecord, part: ArrayRecord) -> ArrayRecord:
    """``whole`` with the entries of ``part`` replaced (order and the other entries kept).

    Raises
    ------
    FedvisionError
        ``part`` has an entry that the model does not have.
    """
    unknown = [k for k in part if k not in whole]
    if unknown:
        raise FedvisionError(
            f"the aggregate holds arrays the model lacks ({', '.join(unknown[:3])}); the "
            "strategy returned other keys than it was given"
        )
    return ArrayRecord({k: part[k] if k in part else whole[k] for k in whole})


def base_fingerprint(arrays: ArrayRecord, parts: ModelParts) -> str:
    """Fingerprint of the entries a client takes from its base weights ("" when there are none).

    The server never changes these entries of its global model, so the value is the same every
    round and after a resume.
    """
    return fingerprint({k: arrays[k].numpy() for k in parts.unsent}, parts.unsent)


def check_local_bn(cfg: Mapping[str, Any]) -> None:
    """Refuse FedBN settings that cannot work (before any data work).

    FedBN needs BatchNorm layers that train, and it is evaluated on the clients' own models, so
    the clients must evaluate (``strategy.fraction_evaluate > 0``).
    """
    if not local_bn(cfg):
        return
    model = cfg["model"]
    name, finetune = str(model["name"]), str(model.get("finetune", "full"))
    net = build_model(name, 2, finetune=finetune, last_k=int(model.get("last_k", 1)))
    if not batchnorm_keys(net):
        raise FedvisionError(
            f"client.local_bn=true (FedBN) keeps BatchNorm layers local, but {name} has none; "
            "pick a model with BatchNorm or set client.local_bn=false"
        )
    if not split_parts(net, local_bn=True).local:
        raise FedvisionError(
            f"client.local_bn=true (FedBN): no BatchNorm layer of {name} trains with "
            f"model.finetune={finetune}; use finetune=full or last_k, or client.local_bn=false"
        )
    if float(cfg["strategy"].get("fraction_evaluate", 0.0)) <= 0:
        raise FedvisionError(
            "client.local_bn=true (FedBN) is evaluated on each client's own model (shared weights "
            "+ its BatchNorm) on its local validation part: set strategy.fraction_evaluate > 0 "
            "(1.0: every client)"
        )


class FedBNRound(Feature):
    """FedBN in the round loop: counts the clients whose BatchNorm started from the base."""

    @classmethod
    def build(
        cls, cfg: Mapping[str, Any], resumed: Any, *, states_kept: bool = False
    ) -> FedBNRound | None:
        """The hook for a FedBN run (None otherwise); says what a resume cannot keep (the
        clients' BatchNorm, unless they keep it in the run directory: ``states_kept``)."""
        if not local_bn(cfg):
            return None
        if resumed is not None and not states_kept:
            tqdm.write(
                "fedvision: FedBN resumes with every client's BatchNorm back at the initial "
                "weights (the clients' own BatchNorm is not in the checkpoint)",
                file=sys.stderr,
            )
        return cls()

    def record(self, rnd: int, ok: Sequence[Message]) -> dict[str, Any]:
        """``clients_new_bn``: each client once in a run, unless the runtime lost its state."""
        return {
            "clients_new_bn": sum(int(m.content[C.KEY_METRICS].get(C.KEY_NEW_BN, 0)) for m in ok)
        }

    def summary(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Marks the run as FedBN (its selection is on the clients' validation)."""
        return {"local_bn": True}
