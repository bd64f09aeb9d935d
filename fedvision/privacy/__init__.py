"""Differential privacy: accounting of client-level DP (Opacus' RDP accountant).

The Flower side (strategy wrappers, client clipping mods, round config) is
``fedvision.fl.privacy``; sample-level DP-SGD is ``fedvision.engine.dpsgd``.
"""

from fedvision.privacy.accounting import (
    SAMPLING_ASSUMPTION,
    ClientLevelAccountant,
    effective_noise_multiplier,
)

__all__ = ["SAMPLING_ASSUMPTION", "ClientLevelAccountant", "effective_noise_multiplier"]
