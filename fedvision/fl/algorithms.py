"""Client and server glue for algorithms that send more than weights: SCAFFOLD and FedNova.

The maths of the server side lives in the strategies (``strategies/scaffold.py``,
``strategies/fednova.py``); training lives in the engine (``train_local``'s ``grad_correction``).
This module connects them to messages and to the client's ``Context.state``:

- SCAFFOLD's client control variate ``c_i`` is kept in ``Context.state`` (as FedBN keeps its
  BatchNorm), packed like the shared parameters of the model, zeros the first time. Every packed
  entry is a trained parameter: BatchNorm's running statistics travel in their own record and
  get neither a control variate nor FedNova's normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.models import ModelParts
from strategies.fednova import momentum_steps


def _flat(record: ArrayRecord, what: str, size: int) -> np.ndarray:
    if list(record.keys()) != [C.KEY_FLAT] or record[C.KEY_FLAT].numpy().size != size:
        raise FedvisionError(
            f"{what} does not fit this client's shared model ({size} values): client and "
            "server run different models"
        )
    return np.asarray(record[C.KEY_FLAT].numpy(), dtype=np.float32).reshape(-1)


@dataclass
class Controls:
    """SCAFFOLD's control variates of one round on one client, flat over the shared part."""

    c: np.ndarray  # the server's, as received
    c_i: np.ndarray  # this client's, before training


def read_controls(
    msg: Message, context: Context, model: torch.nn.Module, parts: ModelParts, optimizer: str
) -> Controls | None:
    """The round's control variates, or ``None`` when the message carries no ``c`` (not SCAFFOLD).

    ``c_i`` comes from ``context.state`` (zeros the first time this node trains).
    """
    record = msg.content.array_records.get(C.KEY_CONTROL)
    if record is None:
        return None
    if optimizer != "sgd":  # the server refuses it too; a hand-made run config may not
        raise FedvisionError(
            f"SCAFFOLD (option II) needs local SGD, but this round's optimizer is {optimizer}"
        )
    state = model.state_dict()
    size = sum(state[k].numel() for k in parts.shared)
    c = _flat(record, "the server's control variate", size)
    own = context.state.get(C.STATE_CONTROL)
    c_i = (
        np.zeros_like(c)
        if own is None
        else _flat(own, "this client's stored control variate", size)
    )
    return Controls(c=c, c_i=c_i)


def grad_correction(
    controls: Controls, model: torch.nn.Module, parts: ModelParts
) -> list[torch.Tensor]:
    """``c - c_i`` per trainable parameter, in ``trainable_parameters`` order (0 when not shared).

    A FedBN client's own BatchNorm weights are trainable but not shared: no control variate.
    """
    state = model.state_dict()
    offsets, start = {}, 0
    for k in parts.shared:
        offsets[k] = start
        start += state[k].numel()
    diff = controls.c - controls.c_i
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in offsets:
            piece = diff[offsets[name] : offsets[name] + p.numel()]
            out.append(torch.from_numpy(piece.copy()).reshape(p.shape))
        else:
            out.append(torch.zeros_like(p, device="cpu"))
    return out


def update_controls(
    controls: Controls, x: np.ndarray, y: np.ndarray, steps: int, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """Option II: ``c_i+ = c_i - c + (x - y) / (a * lr)`` over the packed parameters.

    ``a`` is ``steps`` for plain SGD and :func:`~strategies.fednova.momentum_steps` with momentum
    (the coefficient sum of ``steps`` momentum steps). Returns ``(c_i+, c_i+ - c_i)``.
    """
    a = momentum_steps(steps, momentum)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    new = (controls.c_i.astype(np.float64) - controls.c + (x64 - y64) / (a * lr)).astype(np.float32)
    return new, (new.astype(np.float64) - controls.c_i).astype(np.float32)


def store_controls(context: Context, c_i: np.ndarray) -> None:
    """Keep ``c_i`` in this node's Context for its next round."""
    context.state[C.STATE_CONTROL] = ArrayRecord({C.KEY_FLAT: Array(c_i)})


def packed_record(values: np.ndarray) -> ArrayRecord:
    """A flat float32 vector as the one-array record messages carry."""
    return ArrayRecord({C.KEY_FLAT: Array(np.asarray(values, dtype=np.float32))})
