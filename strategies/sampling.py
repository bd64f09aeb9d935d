"""Reproducible client sampling as a strategy wrapper around any Flower Message-API strategy.

Flower's strategies draw each round's nodes with the global ``random`` module over node ids that
are random themselves, so a rerun or a resumed run trains other clients. ``SeededSampling``
keeps the wrapped strategy in charge of *how many* nodes a round uses (its own
``fraction_train`` / ``min_train_nodes`` / ``min_available_nodes``, and the same for evaluation)
and of *what* they are sent, and decides only *which* nodes: a generator seeded by
``(seed, round)`` draws partition ids, so round r trains the same clients in every run.

It wraps like Flower's own wrappers (the DP strategies take a ``strategy`` too), so either can
wrap the other. It also bounds the one wait in Flower's sampling: a round that needs more nodes
than are connected fails after ``wait_timeout_s`` with a clear error instead of sleeping forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvision.errors import FedvisionError

# Evaluation draws from its own stream so that train and evaluate samples are independent.
EVALUATE_STREAM = 10**6


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """Flower's rule for how many nodes a round uses: ``max(int(fraction * n), minimum)``."""
    if fraction == 0.0:
        return 0
    return max(int(num_nodes * fraction), minimum)


def draw_partitions(
    partition_ids: Iterable[int], count: int, seed: int, server_round: int
) -> list[int]:
    """Draw ``count`` of ``partition_ids``, without replacement, seeded by ``(seed, round)``."""
    ids = sorted(partition_ids)
    count = min(count, len(ids))
    if count <= 0:
        return []
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(ids, size=count, replace=False))


def base_strategy(strategy: Strategy) -> Strategy:
    """The innermost strategy of a wrapper chain (the one with the sampling settings)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


class HeldNodes:
    """A grid that lists only the connected nodes holding a partition; the rest is ``grid``'s."""

    def __init__(self, grid: Grid, partition_of: Mapping[int, int]) -> None:
        self._grid, self._held = grid, partition_of

    def get_node_ids(self) -> list[int]:
        """The grid's connected nodes that hold a partition."""
        return [n for n in self._grid.get_node_ids() if n in self._held]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SeededSampling(Strategy):
    """Choose each round's nodes by ``(seed, round)`` over partition ids; delegate the rest.

    Parameters
    ----------
    strategy : the strategy that configures and aggregates (FedAvg, FedProx, a DP wrapper, ...).
    seed : the run's seed.
    partition_of : node id -> partition id of every connected node; set it (``set_partitions``)
        once the nodes have said which partition they hold.
    wait_timeout_s : how long a round waits for the nodes it needs before it fails.
    """

    def __init__(
        self,
        strategy: Strategy,
        seed: int,
        partition_of: Mapping[int, int] | None = None,
        wait_timeout_s: float = 120.0,
    ) -> None:
        self.strategy = strategy
        self.seed = int(seed)
        self.partition_of: dict[int, int] = dict(partition_of or {})
        self.wait_timeout_s = float(wait_timeout_s)

    def set_partitions(self, partition_of: Mapping[int, int]) -> None:
        """Tell the sampler which partition each node holds."""
        self.partition_of = dict(partition_of)

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def _wait_for_nodes(self, grid: Grid, needed: int) -> list[int]:
        deadline = time.monotonic() + self.wait_timeout_s
        while len(nodes := [n for n in grid.get_node_ids() if n in self.partition_of]) < needed:
            if time.monotonic() > deadline:
                raise FedvisionError(
                    f"a round needs {needed} clients but only {len(nodes)} are connected after "
                    f"{self.wait_timeout_s:g} s; lower strategy.min_available_nodes / "
                    "min_train_nodes or bring the clients back"
                )
            time.sleep(0.2)
        return nodes

    def _assign(
        self, messages: list[Message], grid: Grid, server_round: int, stream: int
    ) -> list[Message]:
        if not messages:
            return messages
        nodes = self._wait_for_nodes(grid, len(messages))
        node_of = {self.partition_of[n]: n for n in nodes}
        chosen = draw_partitions(node_of, len(messages), self.seed, stream + server_round)
        # The wrapped strategy sent every node the same content; only the addressees change.
        for message, pid in zip(messages, chosen, strict=True):
            message.metadata.dst_node_id = node_of[pid]
        return messages

    def _configure(
        self, kind: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        base = base_strategy(self.strategy)
        fraction = float(getattr(base, f"fraction_{kind}", 1.0))
        minimum = int(getattr(base, f"min_{kind}_nodes", 0))
        available = int(getattr(base, "min_available_nodes", 0))
        if fraction == 0.0:
            return []
        # Flower's sample_nodes sleeps until enough nodes are connected, without a limit.
        connected = len(self._wait_for_nodes(grid, max(available, minimum)))
        if sample_size(connected, fraction, minimum) == 0:
            raise FedvisionError(
                f"round {server_round} would sample 0 of {connected} clients to {kind}: "
                f"raise strategy.fraction_{kind} or strategy.min_{kind}_nodes"
            )
        configure = getattr(self.strategy, f"configure_{kind}")
        stream = 0 if kind == "train" else EVALUATE_STREAM
        # The wrapped strategy counts only nodes that hold a partition: a node refused one (or
        # the old node of a restarted client, still listed) is no client to sample.
        held = HeldNodes(grid, self.partition_of)
        return self._assign(
            list(configure(server_round, arrays, config, held)), grid, server_round, stream
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's train messages, addressed to this round's seeded sample."""
        return self._configure("train", server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the wrapped strategy."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluate messages, addressed to a seeded sample."""
        return self._configure("evaluate", server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate with the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)
