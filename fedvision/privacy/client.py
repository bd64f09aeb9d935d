"""Privacy on a client: Flower's clipping mods and what a round's config asks of the client.

The server owns the config: each round's ConfigRecord says which client-level mode is on and, under
DP-SGD, its settings (:meth:`fedvision.privacy.plan.PrivacyPlan.round_config`). A module-level
ClientApp serves every run, so the clipping mod and DP-SGD are chosen per message from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedvision import constants as C
from fedvision.privacy.dpsgd import DPSGDConfig

# The Flower mod a client applies to its train reply in each client-side mode.
CLIENT_MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's client-side clipping mod when the round config asks for it.

    Registered on the train handler only: Flower's mods do not look at the message type, and on
    an evaluate message (no ArrayRecord in the reply) they answer with an error. A module-level
    ClientApp serves every run, so the mod is chosen per message from the server's config rather
    than fixed when the app is built.
    """
    config = msg.content.config_records.get(C.KEY_CONFIG)
    mod = CLIENT_MODS.get(str(config.get(C.KEY_DP_MODE, "none"))) if config else None
    return call_next(msg, context) if mod is None else mod(msg, context, call_next)


def dpsgd_config(record: Mapping[str, Any]) -> DPSGDConfig | None:
    """The DP-SGD settings of a round's ConfigRecord (``None``: train without DP-SGD)."""
    if C.KEY_DPSGD_NOISE not in record:
        return None
    return DPSGDConfig(
        noise_multiplier=float(record[C.KEY_DPSGD_NOISE]),
        max_grad_norm=float(record[C.KEY_DPSGD_CLIP]),
        delta=float(record[C.KEY_DP_DELTA]),
    )


def equal_weights(record: Mapping[str, Any]) -> bool:
    """Whether a train reply must carry weight 1 (client-level DP is on this round)."""
    return str(record.get(C.KEY_DP_MODE, "none")) != "none"
