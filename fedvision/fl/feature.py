"""What a feature of a run (privacy, simulated devices, FedBN) may change in a round.

:func:`fedvision.fl.loop.run_rounds` calls these hooks at fixed points of every round; a feature
overrides the ones it needs and is built once from the run's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy


@dataclass
class Trained:
    """What a round's exchange gave the loop: the global model after it, and what to record."""

    arrays: ArrayRecord  # the whole global model (the one it started from if nothing aggregated)
    metrics: Mapping[str, Any] | None  # the aggregated train metrics; None: no aggregate
    record: dict[str, Any]  # entries of the round's metrics.jsonl record


class Feature:
    """A feature's hooks into the round loop, called in this order; each default does nothing."""

    def stop(self, rnd: int) -> str | None:
        """Before round ``rnd``: a reason to end the run instead (it stops after ``rnd - 1``)."""
        return None

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Entries for the round's train ConfigRecord."""
        return {}

    def plan(
        self, rnd: int, messages: list[Message], partition_of: Mapping[int, int]
    ) -> list[Message]:
        """The train messages to send (the strategy made ``messages``)."""
        return messages

    def replied(self, ok: Sequence[Message], partition_of: Mapping[int, int]) -> None:
        """Every client that trained and replied in time, before any is left out."""

    def settle(
        self, ok: list[Message], partition_of: Mapping[int, int]
    ) -> tuple[list[Message], dict[str, Any]]:
        """The replies that count, and metrics for the round's record."""
        return ok, {}

    def release(
        self, rnd: int, ok: Sequence[Message], strategy: Strategy, clients: int | None = None
    ) -> bool:
        """Whether the round's aggregate may be made (called only when there are enough).

        ``clients``: how many clients the replies stand for in cohort rounds (else one each).
        """
        return True

    def after_aggregate(self, aggregated: bool) -> None:
        """After the strategy aggregated (``aggregated``: a new global model came out)."""

    def record(self, rnd: int, ok: Sequence[Message]) -> dict[str, Any]:
        """Entries of the round's ``metrics.jsonl`` record."""
        return {}

    def checkpoint(self) -> dict[str, Any]:
        """Fields of :class:`~fedvision.fl.checkpoint.Checkpoint` this feature keeps."""
        return {}

    def summary(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Entries of ``summary.json``."""
        return {}
