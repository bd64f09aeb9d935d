"""Differential privacy, in one home: both levels, server and client side.

- :mod:`fedvision.privacy.plan`: :class:`~fedvision.privacy.plan.PrivacyPlan`, the ``privacy``
  config group read once, and ``check_privacy`` (the refusals before a run);
- :mod:`fedvision.privacy.accounting`: the one RDP epsilon function (Opacus) and client-level
  DP's account over rounds;
- :mod:`fedvision.privacy.server`: Flower's DP wrapper around the strategy and ``PrivacyRound``,
  the round loop's hook (budget, release, records, summary);
- :mod:`fedvision.privacy.client`: the client-side clipping mod and the round config's DP-SGD
  settings;
- :mod:`fedvision.privacy.dpsgd`: sample-level DP-SGD inside one client (Opacus).

``accounting`` and ``dpsgd`` never import flwr (local training calls DP-SGD in one process, as
it calls the engine); ``plan``, ``server`` and ``client`` are the federation's side. So this
package re-exports only the accountant's names: import the other submodules by name.
"""

from fedvision.privacy.accounting import (
    SAMPLING_ASSUMPTION,
    ClientLevelAccountant,
    effective_noise_multiplier,
    rdp_epsilon,
)

__all__ = [
    "SAMPLING_ASSUMPTION",
    "ClientLevelAccountant",
    "effective_noise_multiplier",
    "rdp_epsilon",
]
