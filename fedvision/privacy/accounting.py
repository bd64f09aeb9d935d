"""Epsilon with Opacus' RDP accountant (Mironov 2017): one function, and client-level DP's account.

Each round that releases a noisy aggregate is one sampled Gaussian mechanism with noise multiplier
``z`` (noise std ``z * C / m`` on the mean of ``m`` updates clipped to ``C``: sensitivity ``C / m``)
and sampling rate ``q = m / num_clients``. A round where only ``m' < m`` clients replied (dropout,
a deadline, a timeout) is released at ``z * m' / m``: Flower's wrappers keep the noise of ``m``.
Opacus' analysis assumes Poisson sampling (each client joins a round with probability ``q``);
fedvision samples exactly ``m`` clients without replacement (seeded). The reported epsilon is the
Poisson-sampling figure for the same ``q``; with ``q = 1`` (every client every round) there is no
amplification and the two coincide.

Sample-level DP-SGD (:mod:`fedvision.privacy.dpsgd`) is the same mechanism one level down (each
step a Poisson batch of a client's samples, its gradient sum clipped and noised), so both levels
compute epsilon with the one function :func:`rdp_epsilon`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedvision.errors import FedvisionError

SAMPLING_ASSUMPTION = (
    "RDP of the Poisson-subsampled Gaussian mechanism with q = clients per round / num_clients "
    "(fedvision samples a fixed number without replacement; exact when q = 1)"
)


def rdp_epsilon(multipliers: Iterable[float], sample_rate: float, delta: float) -> float:
    """Epsilon at ``delta`` of Poisson-subsampled Gaussian releases, by Opacus' RDP accountant.

    Parameters
    ----------
    multipliers
        The noise multiplier of each release in order (a client-level round, a DP-SGD step).
    sample_rate
        The probability ``q`` that a client (round) or a sample (step) joins a release.
    delta
        The delta epsilon is reported at.

    Returns
    -------
    float
        ``0`` for no release, ``inf`` if one release had no noise.
    """
    zs = [float(z) for z in multipliers]
    if not zs:
        return 0.0
    if min(zs) <= 0:
        return math.inf
    # Imported here: Opacus loads torch.distributed and scipy (seconds), and a run without DP
    # never needs it.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for z in zs:  # Opacus merges identical steps into one history entry
        accountant.step(noise_multiplier=z, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta))


def effective_noise_multiplier(
    noise_multiplier: float,
    sampled: int,
    replied: int,
    clipped_count_stddev: float | None = None,
) -> float:
    """The noise multiplier of a release that averaged ``replied`` of ``sampled`` clipped updates.

    Flower's wrappers add noise of std ``z * C / m`` (``m = sampled``) to the mean of the ``m'``
    updates that came, whose sensitivity is ``C / m'``: the update is released at ``z * m' / m``.
    With adaptive clipping ``noise_multiplier`` is the update's share ``z_u`` and the clipped
    count carries noise of std ``clipped_count_stddev`` on a count of sensitivity 1 (unchanged by
    ``m'``); the pair composes as one Gaussian mechanism of multiplier
    ``((z_u m'/m)^-2 + (2 sigma_b)^-2)^-1/2`` (Andrew et al. 2021, Theorem 1), which is the
    configured ``z`` when every client replied.
    """
    if not 0 < replied <= sampled:
        raise FedvisionError(f"a release needs 1..{sampled} replies, got {replied}")
    z_update = float(noise_multiplier) * replied / sampled
    if clipped_count_stddev is None:
        return z_update
    if z_update <= 0 or clipped_count_stddev <= 0:
        return 0.0
    return (z_update**-2 + (2.0 * float(clipped_count_stddev)) ** -2) ** -0.5


class ClientLevelAccountant:
    """Cumulative client-level epsilon of a run, and whether the next release fits the budget.

    Each released round is composed at the noise multiplier it was released at (see
    :func:`effective_noise_multiplier`): the configured ``z`` when all sampled clients replied,
    less when some did not.

    Parameters
    ----------
    noise_multiplier : the configured ``z`` (> 0 for a finite epsilon).
    sample_rate : ``q`` = clients per round / num_clients, in (0, 1].
    delta : the delta epsilon is reported at, in (0, 1).
    max_epsilon : stop before a round would take epsilon above this; ``None``: no budget.
    history : the noise multiplier of each round released so far (a resumed run replays them).
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        max_epsilon: float | None = None,
        history: Iterable[float] = (),
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise FedvisionError(f"client sampling rate {sample_rate} must lie in (0, 1]")
        if not 0 < delta < 1:
            raise FedvisionError(f"privacy.delta={delta} must lie in (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self.history = [float(z) for z in history]

    @property
    def releases(self) -> int:
        """Rounds released so far."""
        return len(self.history)

    def epsilon_of(self, multipliers: Iterable[float]) -> float:
        """Epsilon at ``delta`` of releases at these noise multipliers (``inf`` if one is 0)."""
        return rdp_epsilon(multipliers, self.sample_rate, self.delta)

    def epsilon_after(self, releases: int) -> float:
        """Epsilon after ``releases`` rounds at the configured multiplier (``inf``: no noise)."""
        return self.epsilon_of([self.noise_multiplier] * max(releases, 0))

    @property
    def epsilon(self) -> float:
        """Epsilon spent by the rounds released so far."""
        return self.epsilon_of(self.history)

    def step(self, noise_multiplier: float | None = None) -> float:
        """Count one release at ``noise_multiplier`` (default: the configured); return epsilon."""
        z = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        self.history.append(z)
        return self.epsilon

    def exceeds(self, server_round: int, noise_multiplier: float | None = None) -> str | None:
        """Why round ``server_round`` must not be released at ``noise_multiplier`` (the
        configured one by default) without passing ``max_epsilon``, or ``None``."""
        if self.max_epsilon is None:
            return None
        z = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        nxt = self.epsilon_of([*self.history, z])
        if nxt <= self.max_epsilon:
            return None
        return (
            f"privacy budget: round {server_round} would reach epsilon={nxt:.4g} > "
            f"privacy.max_epsilon={self.max_epsilon:g} (delta={self.delta:g}); spent "
            f"epsilon={self.epsilon:.4g}"
        )

    def next_round_exceeds(self, server_round: int) -> str | None:
        """Why round ``server_round`` must not run (at the configured multiplier), or ``None``."""
        return self.exceeds(server_round)
