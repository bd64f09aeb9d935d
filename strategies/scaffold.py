"""SCAFFOLD: local training corrected by control variates (server ``c``, client ``c_i``).

Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"
(ICML), Algorithm 1 with option II for the client's control variate. Each round:

- the server sends the global model ``x`` and its control variate ``c`` (an extra ArrayRecord
  under ``C.KEY_CONTROL``, packed like the model);
- client i trains K steps on ``g + c - c_i`` (its gradient corrected towards the average
  direction), then sets ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` and replies its model ``y_i``
  and ``c_i+ - c_i`` (``C.KEY_CONTROL_DELTA``); ``c_i`` stays with the client (in the run
  directory when clients see it, else its ``Context.state``: :mod:`fedvision.fl.client_state`),
  zeros the first time it trains;
- the server, over the set S of clients that replied:

      x <- x + global_lr * (1/|S|) * sum_i (y_i - x)
      c <- c + (|S| / N) * (1/|S|) * sum_i (c_i+ - c_i)          N = num_clients

  A reply of a cohort worker (``runtime.cohort_workers``) is the unweighted mean of the clients
  it trained and counts as that many (``C.KEY_COHORT_CLIENTS``) in both means and in ``|S|``.
  Both means are *unweighted*, as in the paper: SCAFFOLD's ``c`` estimates the unweighted mean of
  the clients' gradients, so the model step uses the same weights. Under quantity skew this
  differs from FedAvg's example-weighted mean (every client counts once, whatever its size).

Option II assumes plain SGD. With momentum ``rho`` the client divides by
``lr * momentum_steps(K, rho)`` instead of ``lr * K`` (the coefficient sum of K momentum steps,
exact for a constant gradient, equal to K for ``rho=0``); weight decay is part of the gradient in
PyTorch's SGD and so of ``c_i``. Both are approximations the paper does not cover. Adam is refused.

``c`` has an entry for every shared entry (the model's packed shared part), and every shared
entry is a trained parameter: BatchNorm's running statistics travel in a record of their own and
get no control variate. A FedBN client's own BatchNorm weights train but are not shared: their
correction is zero.

Both sides live here, so the algorithm has one home: :class:`Scaffold` is the server's strategy;
:func:`read_controls`, :func:`grad_correction`, :func:`update_controls` and
:func:`store_controls` are the client's, called by the ClientApp around the engine's
``train_local(grad_correction=...)`` (the engine gets plain tensors and never sees a message).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedvision import constants as C
from fedvision.errors import FedvisionError
from strategies._replies import arrays_like, as_record, ok_replies
from strategies.fednova import momentum_steps, require_sgd

if TYPE_CHECKING:  # a type only: strategies import no fedvision layer at run time
    from fedvision.fl.client_state import StateStore


def _zeros_like(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.zeros(tuple(a.shape), dtype=np.float32)) for k, a in arrays.items()}
    )


def _fits(record: ArrayRecord, like: ArrayRecord) -> bool:
    return list(record.keys()) == list(like.keys()) and all(
        tuple(record[k].shape) == tuple(like[k].shape) for k in like
    )


class Scaffold(FedAvg):
    """SCAFFOLD's server side (see the module docstring).

    Parameters
    ----------
    num_clients : N, the number of clients in the federation (``c`` averages over all of them).
    global_lr : server learning rate on the mean model update (1.0: the mean of the models).
    **kwargs : FedAvg's sampling settings (``fraction_train``, ``min_train_nodes``, ...).
    """

    def __init__(self, *, num_clients: int, global_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(num_clients) < 1:
            raise FedvisionError(f"strategy.num_clients={num_clients} must be >= 1")
        if not global_lr > 0:
            raise FedvisionError(f"strategy.global_lr={global_lr} must be > 0")
        self.num_clients = int(num_clients)
        self.global_lr = float(global_lr)
        # The server's control variate c; kept in checkpoints (fedvision.fl.checkpoint).
        self.control: ArrayRecord | None = None
        # The global model of the round being trained; rebuilt at every configure_train.
        self.current_arrays: ArrayRecord | None = None

    def check_client_config(self, client: Mapping[str, Any]) -> None:
        """Refuse local optimisers that option II cannot describe (before a run starts)."""
        require_sgd(client, "strategy=scaffold (option II)")
        # Option II divides each update by one K * lr; a backbone at another rate would get a
        # control variate scaled by its factor.
        factor = float(client.get("backbone_lr_factor", 1.0))
        warmup = int(client.get("head_warmup_rounds", 0))
        if factor != 1.0 or warmup > 0:
            raise FedvisionError(
                "strategy=scaffold (option II) assumes one learning rate for every parameter, "
                f"but client.backbone_lr_factor={factor:g}, client.head_warmup_rounds={warmup}; "
                "set them to 1.0 and 0"
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each also carrying the control variate ``c``."""
        if self.control is None:
            self.control = _zeros_like(arrays)
        elif not _fits(self.control, arrays):
            raise FedvisionError(
                "strategy=scaffold: the saved control variate does not fit the model "
                f"({len(self.control)} arrays vs {len(arrays)}); resume with the run's own model"
            )
        self.current_arrays = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for m in messages:  # FedAvg gives every message the same RecordDict
            m.content[C.KEY_CONTROL] = self.control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unweighted mean model step and control-variate step over the replies."""
        valid = ok_replies(replies)
        if not valid:
            return None, None
        x, c = self.current_arrays, self.control
        if x is None or c is None:
            raise FedvisionError("SCAFFOLD: aggregate_train came before configure_train")
        who = "strategy=scaffold"
        # A cohort's reply (fedvision.fl.cohort) is the unweighted mean of the clients its
        # worker trained: it counts as that many; a client's own reply counts once.
        counts = np.array(
            [float(m.content[C.KEY_METRICS].get(C.KEY_COHORT_CLIENTS, 1)) for m in valid]
        )
        if counts.sum() > self.num_clients:
            raise FedvisionError(
                f"{who}: {counts.sum():g} clients replied but strategy.num_clients="
                f"{self.num_clients}; set it to the run's num_clients"
            )
        ys = [arrays_like(m, self.arrayrecord_key, x, who) for m in valid]
        dcs = [arrays_like(m, C.KEY_CONTROL_DELTA, x, who) for m in valid]
        share = counts.sum() / self.num_clients  # |S| / N
        new_x, new_c = {}, {}
        for k in x:
            xk = np.asarray(x[k].numpy(), dtype=np.float64)
            step = np.average([y[k] - xk for y in ys], axis=0, weights=counts)
            new_x[k] = xk + self.global_lr * step
            ck = np.asarray(c[k].numpy(), dtype=np.float64)
            new_c[k] = ck + share * np.average([dc[k] for dc in dcs], axis=0, weights=counts)
        self.control = as_record(new_c, c)
        metrics = aggregate_metricrecords([m.content for m in valid], self.weighted_by_key)
        return as_record(new_x, x), metrics


# --- the client side -----------------------------------------------------------------------------


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
    msg: Message, store: StateStore, model: torch.nn.Module, shared: Sequence[str], optimizer: str
) -> Controls | None:
    """The round's control variates, or ``None`` when the message carries no ``c`` (not SCAFFOLD).

    ``shared`` names the model's packed state-dict entries, in packing order; ``c_i`` comes from
    the client's ``store`` (its Context's state, or its files: :mod:`fedvision.fl.client_state`),
    zeros the first time this client trains.
    """
    record = msg.content.array_records.get(C.KEY_CONTROL)
    if record is None:
        return None
    if optimizer != "sgd":  # the server refuses it too; a hand-made run config may not
        raise FedvisionError(
            f"SCAFFOLD (option II) needs local SGD, but this round's optimizer is {optimizer}"
        )
    state = model.state_dict()
    size = sum(state[k].numel() for k in shared)
    own = store.get(C.STATE_CONTROL)
    c_i = None if own is None else _flat(own, "this client's stored control variate", size)
    return controls_of(record, c_i, size)


def controls_of(record: ArrayRecord, c_i: np.ndarray | None, size: int) -> Controls:
    """The server's ``c`` (``record``) and a client's stored ``c_i`` (None: zeros)."""
    c = _flat(record, "the server's control variate", size)
    if c_i is None:
        return Controls(c=c, c_i=np.zeros_like(c))
    if c_i.size != size:
        raise FedvisionError(
            f"a client's stored control variate has {c_i.size} values, the shared model {size}"
        )
    return Controls(c=c, c_i=np.asarray(c_i, dtype=np.float32).reshape(-1))


def grad_correction(
    controls: Controls, model: torch.nn.Module, shared: Sequence[str]
) -> list[torch.Tensor]:
    """``c - c_i`` per trainable parameter, in ``trainable_parameters`` order (0 when not shared).

    A FedBN client's own BatchNorm weights are trainable but not shared: no control variate.
    """
    state = model.state_dict()
    offsets, start = {}, 0
    for k in shared:
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


def store_controls(store: StateStore, c_i: np.ndarray) -> None:
    """Keep ``c_i`` in the client's ``store`` for its next round."""
    store[C.STATE_CONTROL] = ArrayRecord({C.KEY_FLAT: Array(c_i)})


def packed_record(values: np.ndarray) -> ArrayRecord:
    """A flat float32 vector as the one-array record messages carry."""
    return ArrayRecord({C.KEY_FLAT: Array(np.asarray(values, dtype=np.float32))})
