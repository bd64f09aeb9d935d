"""FedAvg over model updates, on Flower's legacy strategy API (what SecAgg+ runs with in 1.39).

Flower 1.39's ``SecAggPlusWorkflow`` sums clipped, quantised vectors, so what clients send should
be small and centred on zero: an update ``new weights - global weights`` (McMahan et al. 2017
average updates; the mean update added to the global model is FedAvg's mean of the weights)
rather than the weights themselves, whose BatchNorm variances and counters would need a wide
clipping range and so a coarse quantisation step.
"""

from __future__ import annotations

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    MetricsAggregationFn,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg


class FedAvgOfUpdates(FedAvg):
    """Legacy ``FedAvg`` whose clients reply with updates; the server adds their weighted mean.

    Under SecAgg+ every ``FitRes`` the strategy receives carries the same, already averaged,
    update (the workflow unmasks only the sum), so ``FedAvg.aggregate_fit`` returns it unchanged;
    without SecAgg+ it averages the updates itself. Either way the new global model is the old one
    plus the example-weighted mean update, in the global model's dtype.
    """

    def __init__(
        self, *, fit_metrics_aggregation_fn: MetricsAggregationFn | None = None, **kwargs: object
    ) -> None:
        super().__init__(fit_metrics_aggregation_fn=fit_metrics_aggregation_fn, **kwargs)  # type: ignore[arg-type]
        self._global: NDArrays | None = None  # the model the current round's clients started from

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the global model this round starts from, then sample as FedAvg does."""
        self._global = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The global model plus the example-weighted mean of the clients' updates."""
        mean, metrics = super().aggregate_fit(server_round, results, failures)
        if mean is None or self._global is None:
            return None, metrics
        update = parameters_to_ndarrays(mean)
        new = [
            (np.asarray(g, dtype=np.float64) + u).astype(g.dtype)
            for g, u in zip(self._global, update, strict=True)
        ]
        return ndarrays_to_parameters(new), metrics
