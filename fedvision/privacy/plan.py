"""A run's privacy, read once from its config: :class:`PrivacyPlan`, and the checks before a run.

The ``privacy`` config group names a Flower DP wrapper (client-level DP), DP-SGD's settings
(sample-level DP), ``delta`` and a budget. :meth:`PrivacyPlan.from_config` resolves and types
them once; the server's hook (:mod:`fedvision.privacy.server`), the strategy's wrapper and the
round config then read the plan, not the raw mapping. :func:`check_privacy` refuses impossible
settings in one line each before any data work.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from hydra.utils import get_class

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.privacy.accounting import ClientLevelAccountant
from strategies.sampling import sample_size

# Where each Flower wrapper clips, as the round config tells the clients.
MODES: dict[type, str] = {
    DifferentialPrivacyServerSideFixedClipping: "server-fixed",
    DifferentialPrivacyServerSideAdaptiveClipping: "server-adaptive",
    DifferentialPrivacyClientSideFixedClipping: "client-fixed",
    DifferentialPrivacyClientSideAdaptiveClipping: "client-adaptive",
}
ADAPTIVE = ("server-adaptive", "client-adaptive")
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class SampleLevel:
    """DP-SGD's settings as configured (:func:`check_privacy` checks them, not the plan)."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run's ``privacy`` group asks for, resolved and typed once.

    Building a plan resolves the wrapper class (a bad ``_target_`` raises) and nothing else:
    values are checked by :func:`check_privacy` and by building the wrapper, in that order, so
    that a config with several problems is refused for the same one as ever.

    Attributes
    ----------
    wrapper : Flower's DP wrapper class; ``None``: no client-level DP.
    wrapper_args : the wrapper's config node (``_target_`` and its arguments), read-only.
    mode : ``none`` or where client-level DP clips (server-/client- fixed/adaptive).
    noise_multiplier : client-level ``z`` (what the accountant composes; 0 without).
    clipping_norm : the fixed clipping norm, or the adaptive wrappers' initial one.
    num_clients : clients of the run.
    num_sampled_clients : clients per round, by Flower's rule (all connect before round 1).
    delta : the delta every epsilon is reported at.
    max_epsilon : the client-level budget; ``None``: no budget.
    dpsgd : sample-level DP-SGD's settings; ``None``: no DP-SGD.
    """

    wrapper: type | None
    wrapper_args: Mapping[str, Any]
    mode: str
    noise_multiplier: float
    clipping_norm: float
    num_clients: int
    num_sampled_clients: int
    delta: float
    max_epsilon: float | None
    dpsgd: SampleLevel | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrivacyPlan:
        """The plan of a run's config (Hydra node or plain mapping)."""
        # Runs saved before the privacy group existed have none: no DP.
        p = cfg.get("privacy") or {}
        node = p.get("wrapper") or {}
        wrapper = _wrapper_class(node) if node else None
        mode = "none" if wrapper is None else MODES[wrapper]
        # Flower's adaptive wrappers start from their own default norm; a fixed one has none.
        norm = (
            node.get("initial_clipping_norm", 0.1)
            if mode in ADAPTIVE
            else node.get("clipping_norm", 0.0)
        )
        dpsgd = p.get("dpsgd")
        budget = p.get("max_epsilon")
        return cls(
            wrapper=wrapper,
            wrapper_args=MappingProxyType(dict(node)),
            mode=mode,
            noise_multiplier=float(node.get("noise_multiplier", 0.0)),
            clipping_norm=float(norm),
            num_clients=int(cfg["num_clients"]),
            num_sampled_clients=num_sampled_clients(cfg),
            delta=float(p.get("delta", DEFAULT_DELTA)),
            max_epsilon=None if budget is None else float(budget),
            dpsgd=(
                SampleLevel(
                    noise_multiplier=float(dpsgd.get("noise_multiplier", 0.0)),
                    max_grad_norm=float(dpsgd.get("max_grad_norm", 0.0)),
                )
                if dpsgd
                else None
            ),
        )

    @property
    def client_level(self) -> bool:
        """Whether a Flower DP wrapper noises the aggregate."""
        return self.wrapper is not None

    @property
    def any(self) -> bool:
        """Whether either level of DP is on."""
        return self.client_level or self.dpsgd is not None

    @property
    def server_clipping_norm(self) -> float | None:
        """The fixed norm the server clips each update to (``server-fixed``), else ``None``."""
        return self.clipping_norm if self.mode == "server-fixed" else None

    @property
    def norm_key(self) -> str:
        """The wrapper's argument that holds :attr:`clipping_norm`."""
        return "initial_clipping_norm" if self.mode in ADAPTIVE else "clipping_norm"

    def accountant(self, records: Sequence[Mapping[str, Any]] = ()) -> ClientLevelAccountant | None:
        """The run's client-level accountant (``None`` without client-level DP).

        ``records`` are the rounds of ``metrics.jsonl`` a resumed run keeps: their releases are
        composed again at the multiplier each was released at (``dp_noise_multiplier``).
        """
        if not self.client_level:
            return None
        return ClientLevelAccountant(
            self.noise_multiplier,
            self.num_sampled_clients / self.num_clients,
            self.delta,
            self.max_epsilon,
            history=released_multipliers(self.noise_multiplier, records),
        )

    def round_config(self) -> dict[str, str | float]:
        """What the clients need to know of the privacy settings, for the round's ConfigRecord."""
        out: dict[str, str | float] = {C.KEY_DP_MODE: self.mode}
        if self.dpsgd is not None:
            out[C.KEY_DPSGD_NOISE] = self.dpsgd.noise_multiplier
            out[C.KEY_DPSGD_CLIP] = self.dpsgd.max_grad_norm
            out[C.KEY_DP_DELTA] = self.delta
        return out


def _wrapper_class(node: Mapping[str, Any]) -> type:
    """The Flower DP wrapper a ``privacy.wrapper`` node's ``_target_`` names."""
    target = str(node.get("_target_", ""))
    try:
        cls = get_class(target)
    except Exception as exc:  # Hydra raises several types for a bad path
        raise FedvisionError(f"privacy.wrapper._target_={target!r} cannot be imported") from exc
    if cls not in MODES:
        raise FedvisionError(
            f"privacy.wrapper._target_={target!r} is not one of Flower's DP wrappers: "
            + ", ".join(c.__name__ for c in MODES)
        )
    return cls


def num_sampled_clients(cfg: Mapping[str, Any]) -> int:
    """Clients per round, by Flower's rule over ``num_clients`` (all connect before round 1)."""
    s = cfg["strategy"]
    return sample_size(
        int(cfg["num_clients"]),
        float(s.get("fraction_train", 1.0)),
        int(s.get("min_train_nodes", 0)),
    )


def client_level_mode(cfg: Mapping[str, Any]) -> str:
    """``none`` or where client-level DP clips: server-/client- fixed/adaptive."""
    return PrivacyPlan.from_config(cfg).mode


def server_clipping_norm(cfg: Mapping[str, Any]) -> float | None:
    """The fixed norm the server clips each update to (``server_fixed``), else ``None``."""
    return PrivacyPlan.from_config(cfg).server_clipping_norm


def released_multipliers(z: float, records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The noise multiplier of each release recorded in ``records`` (``metrics.jsonl`` rows)."""
    out = [float(r["dp_noise_multiplier"]) for r in records if "dp_noise_multiplier" in r]
    count = int(records[-1].get("dp_releases", 0)) if records else 0
    # Runs recorded before the per-round multiplier released every round at the configured z.
    return out if len(out) == count else [z] * count


def check_privacy(cfg: Mapping[str, Any]) -> None:
    """Refuse impossible privacy settings with one line each (before any data work).

    Client-level settings are checked by building the wrapper (``check_strategy`` builds the
    strategy); this checks delta, the budget and DP-SGD.
    """
    plan = PrivacyPlan.from_config(cfg)
    if plan.any and importlib.util.find_spec("opacus") is None:
        raise FedvisionError(
            "differential privacy needs Opacus (DP-SGD and the RDP accountant): "
            'pip install -e ".[dp]" (scripts/setup.sh installs it)'
        )
    delta, budget = plan.delta, plan.max_epsilon
    if not 0 < delta < 1:
        raise FedvisionError(f"privacy.delta={delta} must lie in (0, 1)")
    if budget is not None:
        if not (math.isfinite(budget) and budget > 0):
            raise FedvisionError(f"privacy.max_epsilon={budget} must be > 0 (or null: no budget)")
        if not plan.client_level:
            raise FedvisionError(
                "privacy.max_epsilon stops a run on its client-level epsilon; pick a client-level "
                "option (privacy=server_fixed, client_fixed, server_adaptive, client_adaptive)"
            )
    if plan.client_level:
        check_statistics_stay(cfg)
        z = plan.noise_multiplier
        if budget is not None:
            if z <= 0:
                raise FedvisionError(
                    "privacy.max_epsilon needs privacy.wrapper.noise_multiplier > 0 (without "
                    "noise epsilon is infinite)"
                )
            acc = plan.accountant()
            first = acc.epsilon_after(1) if acc is not None else math.inf
            if first > budget:
                raise FedvisionError(
                    f"privacy.max_epsilon={budget:g} is below one round's epsilon={first:.4g} "
                    f"(noise_multiplier={z:g}, q={acc.sample_rate if acc else 0:g}, "
                    f"delta={delta:g}): raise the budget or the noise"
                )
    if plan.dpsgd is not None:
        check_dpsgd_settings(cfg, plan.dpsgd, delta)


def check_dpsgd_settings(cfg: Mapping[str, Any], dpsgd: SampleLevel, delta: float) -> None:
    """Refuse DP-SGD settings, and companions of DP-SGD, that cannot run (one line each)."""
    # The model factory and Opacus' validators load torch and friends: only needed here.
    from fedvision.models import build_model
    from fedvision.privacy.dpsgd import check_dpsgd, check_dpsgd_model

    check_dpsgd(dpsgd.noise_multiplier, dpsgd.max_grad_norm, delta)
    if str(cfg["strategy"].get("_target_", "")).endswith(".Scaffold"):
        raise FedvisionError(
            "privacy.dpsgd does not apply SCAFFOLD's gradient correction (Opacus clips "
            "per-sample gradients before it could): use strategy=fedavg or fednova with DP-SGD"
        )
    if float(cfg["strategy"].get("proximal_mu", 0.0)) > 0:
        raise FedvisionError(
            "privacy.dpsgd clips per-sample gradients and the proximal term has none: use "
            "strategy=fedavg with DP-SGD"
        )
    if bool(cfg["client"].get("local_bn", False)):
        raise FedvisionError(
            "privacy.dpsgd freezes BatchNorm, so client.local_bn (FedBN) has nothing to keep "
            "local; set client.local_bn=false"
        )
    model = cfg["model"]
    net = build_model(
        str(model["name"]), 2,
        finetune=str(model.get("finetune", "full")), last_k=int(model.get("last_k", 1)),
    )  # fmt: skip
    check_dpsgd_model(net)


def check_statistics_stay(cfg: Mapping[str, Any]) -> None:
    """Refuse client-level DP where BatchNorm running statistics would travel.

    The wrappers clip and noise parameters only; running statistics are means of each client's
    features, and sending them un-noised would leak what the noise protects. Keeping them local
    silently would evaluate the global model with stale statistics, so the user picks.
    """
    from fedvision.fl.parts import run_parts  # builds the model: only needed under DP

    model = cfg["model"]
    if run_parts(cfg, 2).stats:
        raise FedvisionError(
            f"client-level DP noises parameters only, but {model['name']} with "
            f"model.finetune={model.get('finetune', 'full')} also sends BatchNorm running "
            "statistics (averages of each client's data) un-noised: use model.finetune=head "
            "(BatchNorm frozen), client.bn_mode=eval (BatchNorm keeps the statistics it was "
            "sent), client.local_bn=true (FedBN keeps BatchNorm on the clients) or a model "
            "without BatchNorm"
        )
