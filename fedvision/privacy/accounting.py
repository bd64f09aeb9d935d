"""Epsilon of client-level DP over rounds, with Opacus' RDP accountant (Mironov 2017).

Each round that releases a noisy aggregate is one sampled Gaussian mechanism with noise multiplier
``z`` (noise std ``z * C / m`` on the mean of ``m`` updates clipped to ``C``: sensitivity ``C / m``)
and sampling rate ``q = m / num_clients``. Opacus' analysis assumes Poisson sampling (each client
joins a round with probability ``q``); fedvision samples exactly ``m`` clients without replacement
(seeded). The reported epsilon is the Poisson-sampling figure for the same ``q``; with ``q = 1``
(every client every round) there is no amplification and the two coincide.
"""

from __future__ import annotations

import math

from fedvision.errors import FedvisionError

SAMPLING_ASSUMPTION = (
    "RDP of the Poisson-subsampled Gaussian mechanism with q = clients per round / num_clients "
    "(fedvision samples a fixed number without replacement; exact when q = 1)"
)


class ClientLevelAccountant:
    """Cumulative client-level epsilon of a run, and whether the next round fits the budget.

    Parameters
    ----------
    noise_multiplier : the configured ``z`` (> 0 for a finite epsilon).
    sample_rate : ``q`` = clients per round / num_clients, in (0, 1].
    delta : the delta epsilon is reported at, in (0, 1).
    max_epsilon : stop before a round would take epsilon above this; ``None``: no budget.
    releases : rounds already released (a resumed run replays them).
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        max_epsilon: float | None = None,
        releases: int = 0,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise FedvisionError(f"client sampling rate {sample_rate} must lie in (0, 1]")
        if not 0 < delta < 1:
            raise FedvisionError(f"privacy.delta={delta} must lie in (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self.releases = int(releases)

    def epsilon_after(self, releases: int) -> float:
        """Epsilon at ``delta`` after ``releases`` rounds (``inf`` without noise)."""
        if releases <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        # Imported here: Opacus loads torch.distributed and scipy (seconds), and a run without
        # client-level DP never needs it.
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        for _ in range(releases):  # Opacus merges identical steps into one history entry
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(accountant.get_epsilon(self.delta))

    @property
    def epsilon(self) -> float:
        """Epsilon spent by the rounds released so far."""
        return self.epsilon_after(self.releases)

    def step(self) -> float:
        """Count one released round; return the epsilon spent now."""
        self.releases += 1
        return self.epsilon

    def next_round_exceeds(self, server_round: int) -> str | None:
        """Why round ``server_round`` must not run (it would pass ``max_epsilon``), or ``None``."""
        if self.max_epsilon is None:
            return None
        nxt = self.epsilon_after(self.releases + 1)
        if nxt <= self.max_epsilon:
            return None
        return (
            f"privacy budget: round {server_round} would reach epsilon={nxt:.4g} > "
            f"privacy.max_epsilon={self.max_epsilon:g} (delta={self.delta:g}); spent "
            f"epsilon={self.epsilon:.4g}"
        )
