"""FedAvg over model updates, on Flower's legacy strategy API (what SecAgg+ runs with in 1.39).

Flower 1.39's ``SecAggPlusWorkflow`` sums clipped, quantised vectors, so what clients send should
be small and centred on zero: an update ``new weights - global weights`` (McMahan et al. 2017
average updates; the mean update added to the global model is FedAvg's mean of the weights)
rather than the weights themselves, whose BatchNorm variances and counters would need a wide
clipping range and so a coarse quantisation step.

With a ``seed``, a round's clients are drawn as ``strategies.sampling.SeededSampling`` draws them
on the Message API: by partition id, seeded by ``(seed, round)``, so round r trains the same
partitions in every run. Flower's legacy client manager would pick at random among node ids that
are random themselves. Which node holds which partition is the caller's to say
(:meth:`FedAvgOfUpdates.set_partitions`), as for ``SeededSampling``: fedvision's round loop asks
each node once, whatever app pair it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

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

from fedvision.errors import FedvisionError
from strategies.sampling import draw_partitions


class FedAvgOfUpdates(FedAvg):
    """Legacy ``FedAvg`` whose clients reply with updates; the server adds their weighted mean.

    Under SecAgg+ every ``FitRes`` the strategy receives carries the same, already averaged,
    update (the workflow unmasks only the sum), so ``FedAvg.aggregate_fit`` returns it unchanged;
    without SecAgg+ it averages the updates itself. Either way the new global model is the old one
    plus the example-weighted mean update, in the global model's dtype.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        wait_timeout_s: float = 120.0,  # for every expected node to connect
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(fit_metrics_aggregation_fn=fit_metrics_aggregation_fn, **kwargs)  # type: ignore[arg-type]
        self._global: NDArrays | None = None  # the model the current round's clients started from
        self.seed = seed  # None: Flower's own (unseeded) sampling
        self.wait_timeout_s = float(wait_timeout_s)
        self.partition_of: dict[int, int] = {}  # node id -> the partition it holds
        self.sampled: list[int] = []  # the partitions the last configure_fit chose

    def set_partitions(self, partition_of: Mapping[int, int]) -> None:
        """Tell the sampler which partition each node holds (node id -> partition id)."""
        self.partition_of = dict(partition_of)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the global model this round starts from, then choose the round's clients."""
        self._global = parameters_to_ndarrays(parameters)
        if self.seed is None:
            chosen = super().configure_fit(server_round, parameters, client_manager)
            self.sampled = sorted(self.partition_of.get(int(p.cid), -1) for p, _ in chosen)
            return chosen
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn is not None else {}
        # Wait for every expected node first: Flower sizes the sample on the nodes connected
        # so far, which in round 1 can be fewer than will be there.
        _, min_available = self.num_fit_clients(client_manager.num_available())
        if not client_manager.wait_for(min_available, timeout=int(self.wait_timeout_s)):
            raise FedvisionError(
                f"SecAgg+ round {server_round}: only {client_manager.num_available()} of "
                f"{min_available} clients connected within {self.wait_timeout_s:.0f} s"
            )
        size, _ = self.num_fit_clients(client_manager.num_available())
        nodes = client_manager.all()
        unknown = sorted(int(cid) for cid in nodes if int(cid) not in self.partition_of)
        if unknown:
            raise FedvisionError(
                f"SecAgg+ round {server_round}: node {unknown[0]} holds no known partition "
                "(set_partitions first)"
            )
        pids = {cid: self.partition_of[int(cid)] for cid in nodes}
        self.sampled = draw_partitions(pids.values(), size, int(self.seed), server_round)
        chosen = set(self.sampled)
        fit_ins = FitIns(parameters, config)
        return [(nodes[cid], fit_ins) for cid in sorted(nodes, key=pids.get) if pids[cid] in chosen]

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
