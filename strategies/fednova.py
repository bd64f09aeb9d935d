"""FedNova: FedAvg with each client's update normalised by how much local work it did.

Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization" (NeurIPS). When clients take different numbers of local steps, FedAvg's weighted
mean of their models over-weights the clients that ran longest, and the global model drifts to a
weighted objective nobody asked for. FedNova averages *per-step* updates instead:

    d_i     = (x - y_i) / a_i                    normalised update of client i
    p_i     = n_i / sum_j n_j                    over the clients that replied this round
    tau_eff = sum_i p_i * a_i
    x      <- x - global_lr * tau_eff * sum_i p_i * d_i

``a_i`` is the sum of the coefficients with which client i's local gradients enter its update:
``tau_i`` (its local steps) for plain SGD, and for SGD with momentum ``rho`` (PyTorch's buffer,
which starts at the first gradient) ``a_i = (tau_i - rho * (1 - rho**tau_i) / (1 - rho)) /
(1 - rho)`` (the paper's section 5 with ``tau_i`` local steps). With equal ``a_i`` and
``global_lr=1`` this is FedAvg exactly.

Weight decay: PyTorch's SGD adds ``weight_decay * w`` to the gradient before the momentum buffer,
so it is part of each client's local gradient and is normalised with it; ``a_i`` ignores the
slight shrinking it adds (a relative error of about ``lr * weight_decay * tau_i``). Adam has no such
``a_i``: fedvision refuses FedNova with ``client.optimizer`` other than ``sgd``.

Entries that are not trained by gradient steps (BatchNorm's running statistics) must get FedAvg's
example-weighted mean instead: normalising them could extrapolate a running variance below zero.
fedvision hands strategies parameters only (its server averages the statistics itself), so it
sets no mask; a caller that packs other entries with the parameters marks which are parameters
with ``set_parameter_mask``; without a mask every entry is treated as a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedvision import constants as C
from fedvision.errors import FedvisionError
from strategies._replies import arrays_like, as_record, metric, ok_replies


def momentum_steps(tau: float, rho: float) -> float:
    """Sum of the coefficients of ``tau`` SGD steps with momentum ``rho`` (FedNova's ``a_i``).

    A constant gradient ``g`` moves the weights by ``lr * g * momentum_steps(tau, rho)`` in
    ``tau`` steps of ``torch.optim.SGD(momentum=rho)``; ``rho=0`` gives ``tau``.
    """
    if tau <= 0:
        raise FedvisionError(f"a client reports {tau:g} local steps; FedNova needs at least 1")
    if not 0.0 <= rho < 1.0:
        raise FedvisionError(f"a client reports momentum {rho:g}; FedNova needs 0 <= rho < 1")
    if rho == 0.0:
        return float(tau)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def require_sgd(client: Mapping[str, Any], who: str) -> None:
    """Refuse a local optimiser whose update is no sum of scaled gradients (Adam, AdamW)."""
    optimizer = str(client.get("optimizer", "sgd"))
    if optimizer != "sgd":
        raise FedvisionError(
            f"{who} assumes local SGD (with or without momentum), but client.optimizer="
            f"{optimizer}; set client.optimizer=sgd"
        )


class FedNova(FedAvg):
    """FedAvg that normalises each client's update by its local work (see the module docstring).

    Parameters
    ----------
    global_lr : server learning rate on the normalised update (1.0: the paper's FedNova).
    **kwargs : FedAvg's sampling settings (``fraction_train``, ``min_train_nodes``, ...).
    """

    def __init__(self, *, global_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not global_lr > 0:
            raise FedvisionError(f"strategy.global_lr={global_lr} must be > 0")
        self.global_lr = float(global_lr)
        # The global model of the round being trained; rebuilt at every configure_train.
        self.current_arrays: ArrayRecord | None = None
        # True where a packed entry is a trained parameter (see set_parameter_mask).
        self.parameter_mask: np.ndarray | None = None

    def check_client_config(self, client: Mapping[str, Any]) -> None:
        """Refuse local optimisers FedNova cannot normalise (before a run starts)."""
        require_sgd(client, "strategy=fednova")

    def set_parameter_mask(self, mask: np.ndarray | None) -> None:
        """Which entries of the (concatenated) global arrays are parameters; ``None``: all."""
        self.parameter_mask = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages; the global model is kept to normalise the replies against."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _masks(self, x: ArrayRecord) -> dict[str, np.ndarray]:
        sizes = {k: int(np.prod(x[k].shape)) for k in x}
        total = sum(sizes.values())
        mask = self.parameter_mask if self.parameter_mask is not None else np.ones(total, bool)
        if mask.size != total:
            raise FedvisionError(
                f"FedNova's parameter mask has {mask.size} entries, the global model {total}"
            )
        out, start = {}, 0
        for k, size in sizes.items():
            out[k] = mask[start : start + size].reshape(tuple(x[k].shape))
            start += size
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Normalised averaging of the replies' updates (see the module docstring)."""
        valid = ok_replies(replies)
        if not valid:
            return None, None
        x = self.current_arrays
        if x is None:
            raise FedvisionError("FedNova: aggregate_train came before configure_train")
        who = "strategy=fednova"
        n = np.array([metric(m, self.weighted_by_key, who) for m in valid])
        a = np.array(
            [
                momentum_steps(metric(m, C.KEY_STEPS, who), metric(m, C.KEY_MOMENTUM, who))
                for m in valid
            ]
        )
        if not n.sum() > 0:
            raise FedvisionError(f"{who}: the replies of round {server_round} hold 0 examples")
        p = n / n.sum()
        tau_eff = float(p @ a)
        ys = [arrays_like(m, self.arrayrecord_key, x, who) for m in valid]
        masks = self._masks(x)
        new = {}
        for k in x:
            xk = np.asarray(x[k].numpy(), dtype=np.float64)
            step = sum(pi * (xk - y[k]) / ai for pi, ai, y in zip(p, a, ys, strict=True))
            mean = sum(pi * y[k] for pi, y in zip(p, ys, strict=True))
            new[k] = np.where(masks[k], xk - self.global_lr * tau_eff * step, mean)
        metrics = aggregate_metricrecords([m.content for m in valid], self.weighted_by_key)
        metrics["tau_eff"] = tau_eff
        return as_record(new, x), metrics
