"""Differential privacy in the federation: Flower's DP wrappers, client clipping, round config.

Client-level DP (McMahan et al. 2018, Andrew et al. 2021) is one of Flower 1.39's strategy
wrappers (``privacy.wrapper._target_``) around the configured strategy, inside fedvision's seeded
sampling: ``SeededSampling(DifferentialPrivacy...(FedAvg))``. The wrapper clips each update (on the
server, or on the clients with Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``) and adds
Gaussian noise of std ``noise_multiplier * clipping_norm / num_sampled_clients`` to the aggregate.
That std is calibrated to a *plain* mean of clipped updates, so under client-level DP:

- the inner strategy must aggregate with ``FedAvg.aggregate_train`` (FedAvg, FedProx); server
  optimisers, robust and fair aggregators compute something else and are refused;
- every client's weight is equal: clients reply ``num-examples = 1`` (their real count travels as
  ``num-train``) and the server refuses a round whose replies say otherwise.

Sample-level DP-SGD (``privacy.dpsgd``) runs inside each client (``fedvision.engine.dpsgd``); the
server only sends its settings in the round config.

The server owns the config: each round's ConfigRecord says which client-level mode is on, and the
ClientApp's train handler picks Flower's clipping mod from it per message (:func:`clipping_mod`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from hydra.utils import get_class, instantiate
from tqdm import tqdm

from fedvision import constants as C
from fedvision.engine.dpsgd import DPSGDConfig, check_dpsgd, check_dpsgd_model
from fedvision.errors import FedvisionError
from fedvision.fl.checkpoint import strategy_chain
from fedvision.fl.feature import Feature
from fedvision.privacy import (
    SAMPLING_ASSUMPTION,
    ClientLevelAccountant,
    effective_noise_multiplier,
)
from strategies.sampling import sample_size

# Where each Flower wrapper clips, as the round config tells the clients.
MODES: dict[type, str] = {
    DifferentialPrivacyServerSideFixedClipping: "server-fixed",
    DifferentialPrivacyServerSideAdaptiveClipping: "server-adaptive",
    DifferentialPrivacyClientSideFixedClipping: "client-fixed",
    DifferentialPrivacyClientSideAdaptiveClipping: "client-adaptive",
}
# The Flower mod a client applies to its train reply in each client-side mode.
CLIENT_MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}
ADAPTIVE = ("server-adaptive", "client-adaptive")


def _privacy(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    # Runs saved before the privacy group existed have none: no DP.
    return cfg.get("privacy") or {}


def wrapper_class(cfg: Mapping[str, Any]) -> type | None:
    """The Flower DP wrapper ``privacy.wrapper._target_`` names (``None``: no client-level DP)."""
    wrapper = _privacy(cfg).get("wrapper")
    if not wrapper:
        return None
    target = str(wrapper.get("_target_", ""))
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


def client_level_mode(cfg: Mapping[str, Any]) -> str:
    """``none`` or where client-level DP clips: server-/client- fixed/adaptive."""
    cls = wrapper_class(cfg)
    return "none" if cls is None else MODES[cls]


def server_clipping_norm(cfg: Mapping[str, Any]) -> float | None:
    """The fixed norm the server clips each update to (``server_fixed``), else ``None``."""
    if client_level_mode(cfg) != "server-fixed":
        return None
    return float(_privacy(cfg)["wrapper"]["clipping_norm"])


def update_norm_record(
    replies: Iterable[Message], sent: ArrayRecord, clipping_norm: float | None
) -> dict[str, Any]:
    """How far the clients moved: L2 norms of ``reply - sent`` for ``metrics.jsonl``.

    The norms are of what the server receives (under client-side clipping: already clipped).
    They are how one picks a clipping norm (about the median, Andrew et al. 2021) and they show
    client drift; like the train metrics, they are not noised. With server-side fixed clipping,
    ``clipped_fraction`` is the share of updates the server scaled down.
    """
    base = sent[C.KEY_FLAT].numpy().astype(np.float64)
    norms = [
        float(np.linalg.norm(m.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy() - base))
        for m in replies
        if not m.has_error()
    ]
    if not norms:
        return {}
    out: dict[str, Any] = {
        "update_norm_median": float(np.median(norms)),
        "update_norm_max": max(norms),
    }
    if clipping_norm is not None:
        out["clipped_fraction"] = sum(n > clipping_norm for n in norms) / len(norms)
    return out


def num_sampled_clients(cfg: Mapping[str, Any]) -> int:
    """Clients per round, by Flower's rule over ``num_clients`` (all connect before round 1)."""
    s = cfg["strategy"]
    return sample_size(
        int(cfg["num_clients"]),
        float(s.get("fraction_train", 1.0)),
        int(s.get("min_train_nodes", 0)),
    )


def noise_multiplier(cfg: Mapping[str, Any]) -> float:
    """The configured client-level noise multiplier (what the accountant composes).

    Flower's adaptive wrappers split it between the update and the clipped-count noise (Andrew
    et al.), so that the pair of releases is a Gaussian mechanism of this multiplier.
    """
    return float(_privacy(cfg)["wrapper"].get("noise_multiplier", 0.0))


def wrap_strategy(cfg: Mapping[str, Any], strategy: Strategy) -> Strategy:
    """``strategy`` inside the configured Flower DP wrapper (unchanged without client-level DP)."""
    cls = wrapper_class(cfg)
    if cls is None:
        return strategy
    mode = MODES[cls]
    if not isinstance(strategy, FedAvg) or (
        type(strategy).aggregate_train is not FedAvg.aggregate_train
    ):
        raise FedvisionError(
            f"privacy wrapper {cls.__name__} calibrates its noise to a plain mean of clipped "
            f"updates, which {type(strategy).__name__} does not compute: use strategy=fedavg or "
            "fedprox with client-level DP"
        )
    wrapper = dict(_privacy(cfg)["wrapper"])
    m = num_sampled_clients(cfg)
    given = wrapper.pop("num_sampled_clients", None)
    if given is not None and int(given) != m:
        raise FedvisionError(
            f"privacy.wrapper.num_sampled_clients={given}, but the strategy samples {m} clients "
            "per round; leave it out (fedvision sets it)"
        )
    z = float(wrapper.get("noise_multiplier", 0.0))
    if not (math.isfinite(z) and z >= 0):
        raise FedvisionError(f"privacy.wrapper.noise_multiplier={z} must be >= 0")
    norm_key = "initial_clipping_norm" if mode in ADAPTIVE else "clipping_norm"
    norm = float(wrapper.get(norm_key, 0.1 if mode in ADAPTIVE else 0.0))
    if not (math.isfinite(norm) and norm > 0):
        raise FedvisionError(f"privacy.wrapper.{norm_key}={norm} must be > 0")
    try:
        return instantiate(wrapper, strategy=strategy, num_sampled_clients=m)
    except Exception as exc:  # Flower's own checks raise ValueError, wrapped by Hydra
        cause = exc.__cause__ or exc
        raise FedvisionError(f"privacy.wrapper: {cause}".splitlines()[0]) from exc


def check_privacy(cfg: Mapping[str, Any]) -> None:
    """Refuse impossible privacy settings with one line each (before any data work).

    Client-level settings are checked by building the wrapper (``check_strategy`` builds the
    strategy); this checks delta, the budget and DP-SGD.
    """
    p = _privacy(cfg)
    mode = client_level_mode(cfg)
    dpsgd = p.get("dpsgd")
    if (mode != "none" or dpsgd) and importlib.util.find_spec("opacus") is None:
        raise FedvisionError(
            "differential privacy needs Opacus (DP-SGD and the RDP accountant): "
            'pip install -e ".[dp]" (scripts/setup.sh installs it)'
        )
    delta = float(p.get("delta", 1e-5))
    if not 0 < delta < 1:
        raise FedvisionError(f"privacy.delta={delta} must lie in (0, 1)")
    budget = p.get("max_epsilon")
    if budget is not None:
        budget = float(budget)
        if not (math.isfinite(budget) and budget > 0):
            raise FedvisionError(f"privacy.max_epsilon={budget} must be > 0 (or null: no budget)")
        if mode == "none":
            raise FedvisionError(
                "privacy.max_epsilon stops a run on its client-level epsilon; pick a client-level "
                "option (privacy=server_fixed, client_fixed, server_adaptive, client_adaptive)"
            )
    if mode != "none":
        check_statistics_stay(cfg)
        z = noise_multiplier(cfg)
        if budget is not None:
            if z <= 0:
                raise FedvisionError(
                    "privacy.max_epsilon needs privacy.wrapper.noise_multiplier > 0 (without "
                    "noise epsilon is infinite)"
                )
            acc = accountant(cfg)
            first = acc.epsilon_after(1) if acc is not None else math.inf
            if first > budget:
                raise FedvisionError(
                    f"privacy.max_epsilon={budget:g} is below one round's epsilon={first:.4g} "
                    f"(noise_multiplier={z:g}, q={acc.sample_rate if acc else 0:g}, "
                    f"delta={delta:g}): raise the budget or the noise"
                )
    if dpsgd:
        check_dpsgd(
            float(dpsgd.get("noise_multiplier", 0.0)),
            float(dpsgd.get("max_grad_norm", 0.0)),
            delta,
        )
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
        from fedvision.models import build_model  # the model factory is only needed here

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


def accountant(
    cfg: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = ()
) -> ClientLevelAccountant | None:
    """The run's client-level accountant (``None`` without client-level DP).

    ``records`` are the rounds of ``metrics.jsonl`` a resumed run keeps: their releases are
    composed again at the multiplier each was released at (``dp_noise_multiplier``).
    """
    if client_level_mode(cfg) == "none":
        return None
    p = _privacy(cfg)
    budget = p.get("max_epsilon")
    return ClientLevelAccountant(
        noise_multiplier(cfg),
        num_sampled_clients(cfg) / int(cfg["num_clients"]),
        float(p.get("delta", 1e-5)),
        None if budget is None else float(budget),
        history=released_multipliers(noise_multiplier(cfg), records),
    )


def released_multipliers(z: float, records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The noise multiplier of each release recorded in ``records`` (``metrics.jsonl`` rows)."""
    out = [float(r["dp_noise_multiplier"]) for r in records if "dp_noise_multiplier" in r]
    count = int(records[-1].get("dp_releases", 0)) if records else 0
    # Runs recorded before the per-round multiplier released every round at the configured z.
    return out if len(out) == count else [z] * count


def release_noise_multiplier(strategy: Strategy, sampled: int, replied: int) -> float:
    """The multiplier the DP wrapper in ``strategy``'s chain releases ``replied`` updates at."""
    wrapper = next(s for s in strategy_chain(strategy) if type(s) in MODES)
    # Adaptive wrappers keep the update's share z_u in noise_multiplier, and the count's noise.
    return effective_noise_multiplier(
        wrapper.noise_multiplier, sampled, replied, getattr(wrapper, "clipped_count_stddev", None)
    )


def privacy_round_config(cfg: Mapping[str, Any]) -> dict[str, str | float]:
    """What the clients need to know of the privacy settings, for the round's ConfigRecord."""
    out: dict[str, str | float] = {C.KEY_DP_MODE: client_level_mode(cfg)}
    dpsgd = _privacy(cfg).get("dpsgd")
    if dpsgd:
        out[C.KEY_DPSGD_NOISE] = float(dpsgd["noise_multiplier"])
        out[C.KEY_DPSGD_CLIP] = float(dpsgd["max_grad_norm"])
        out[C.KEY_DP_DELTA] = float(_privacy(cfg).get("delta", 1e-5))
    return out


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


def check_equal_weights(replies: Iterable[Message]) -> None:
    """Refuse a DP round whose replies do not all weigh 1 (the noise assumes a plain mean)."""
    weights = {
        float(m.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES]) for m in replies if not m.has_error()
    }
    if weights - {1.0}:
        raise FedvisionError(
            f"client-level DP needs equal client weights, but replies carry {C.KEY_NUM_EXAMPLES} "
            f"{sorted(weights)}: the clients run another fedvision version"
        )


def privacy_record(
    account: ClientLevelAccountant | None,
    replies: Iterable[Message],
    released_at: float | None = None,
) -> dict[str, Any]:
    """A round's privacy figures for ``metrics.jsonl``.

    ``epsilon``: the run's client-level epsilon after this round (at ``privacy.delta``);
    ``dp_releases``: noisy aggregates released so far; ``dp_noise_multiplier``: the multiplier
    this round was released at (``released_at``: below the configured one when fewer clients
    replied than were sampled); ``dpsgd_epsilon_max``: the largest sample-level epsilon a client
    of this round reports for its own data (DP-SGD).
    """
    out: dict[str, Any] = {}
    if account is not None:
        eps = account.epsilon
        out["epsilon"] = eps if math.isfinite(eps) else None  # JSON has no infinity
        out["dp_releases"] = account.releases
        if released_at is not None:
            out["dp_noise_multiplier"] = released_at
    dpsgd = [
        float(m.content[C.KEY_METRICS][C.KEY_DPSGD_EPSILON])
        for m in replies
        if not m.has_error() and C.KEY_DPSGD_EPSILON in m.content[C.KEY_METRICS]
    ]
    if dpsgd:
        out["dpsgd_epsilon_max"] = max(dpsgd)
    return out


def privacy_summary(
    cfg: Mapping[str, Any],
    account: ClientLevelAccountant | None,
    records: Iterable[Mapping[str, Any]],
    stopped: str | None,
) -> dict[str, Any]:
    """The run's privacy in ``summary.json`` (empty without DP).

    ``epsilon`` is the final client-level epsilon, else the largest DP-SGD epsilon any client
    reported; ``privacy`` says which level, at which delta, under which sampling assumption.
    """
    p = _privacy(cfg)
    dpsgd = p.get("dpsgd")
    if account is None and not dpsgd:
        return {}
    info: dict[str, Any] = {"delta": float(p.get("delta", 1e-5))}
    out: dict[str, Any] = {"privacy": info}
    if account is not None:
        info.update(
            level="client",
            mode=client_level_mode(cfg),
            noise_multiplier=account.noise_multiplier,
            sample_rate=account.sample_rate,
            max_epsilon=account.max_epsilon,
            releases=account.releases,
            # Rounds where fewer clients replied than were sampled: released at less noise.
            releases_below_noise_multiplier=sum(
                z < account.noise_multiplier for z in account.history
            ),
            accountant="opacus.accountants.RDPAccountant",
            sampling=SAMPLING_ASSUMPTION,
        )
        eps = account.epsilon
        out["epsilon"] = eps if math.isfinite(eps) else None
    if dpsgd:
        eps_dpsgd = [r["dpsgd_epsilon_max"] for r in records if "dpsgd_epsilon_max" in r]
        info["dpsgd"] = {
            "noise_multiplier": float(dpsgd["noise_multiplier"]),
            "max_grad_norm": float(dpsgd["max_grad_norm"]),
            "epsilon_max": max(eps_dpsgd) if eps_dpsgd else None,
            "sampling": "Poisson batches of expected size client.batch_size (as the RDP analysis)",
        }
        if account is None:
            info["level"] = "sample"
            out["epsilon"] = info["dpsgd"]["epsilon_max"]
    if stopped:
        out["stopped"] = stopped
    return out


class PrivacyRound(Feature):
    """Privacy in the round loop: client-level DP's account and DP-SGD's steps per client.

    Every round's config says which client-level mode is on (``none`` without DP). Under
    client-level DP a round is released only while the budget allows, at the noise multiplier
    its replies give, and every reply must weigh 1; under DP-SGD each client's steps so far
    travel to it (its epsilon survives a resume) and are kept in the checkpoint.
    """

    def __init__(
        self, cfg: Mapping[str, Any], account: ClientLevelAccountant | None, steps: Mapping
    ) -> None:
        self.cfg = cfg
        self.account = account
        self.sampled = num_sampled_clients(cfg)
        self.dpsgd = bool(_privacy(cfg).get("dpsgd"))
        self.dpsgd_steps = {int(k): int(v) for k, v in steps.items()}
        self.released_at: float | None = None  # the multiplier this round is released at
        self.withheld: str | None = None

    @classmethod
    def build(
        cls, cfg: Mapping[str, Any], history: Sequence[Mapping[str, Any]], resumed: Any
    ) -> PrivacyRound:
        """The hook for a run; a resumed run continues its account and DP-SGD steps."""
        steps = resumed.dpsgd_steps if resumed is not None else {}
        return cls(cfg, accountant(cfg, history), steps)

    def stop(self, rnd: int) -> str | None:
        """The budget's reason to stop before round ``rnd``, if releasing it would pass it."""
        return None if self.account is None else self.account.next_round_exceeds(rnd)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """The privacy settings the clients need, and each client's DP-SGD steps so far."""
        self.released_at, self.withheld = None, None
        out: dict[str, Any] = dict(privacy_round_config(self.cfg))
        if self.dpsgd:
            n = int(self.cfg["num_clients"])
            out[C.KEY_DPSGD_PRIOR] = [int(self.dpsgd_steps.get(p, 0)) for p in range(n)]
        return out

    def replied(self, ok: Sequence[Message], partition_of: Mapping[int, int]) -> None:
        """Each client's DP-SGD steps so far, late replies' included (they trained)."""
        for m in ok:
            if C.KEY_DPSGD_STEPS in m.content[C.KEY_METRICS]:
                pid = partition_of[m.metadata.src_node_id]
                self.dpsgd_steps[pid] = int(m.content[C.KEY_METRICS][C.KEY_DPSGD_STEPS])

    def release(self, rnd: int, ok: Sequence[Message], strategy: Strategy) -> bool:
        """Whether the round's noisy aggregate stays within the budget (always without DP)."""
        if self.account is None:
            return True
        check_equal_weights(ok)
        # Flower's wrappers keep the noise of `sampled` replies for fewer: account for it.
        self.released_at = release_noise_multiplier(strategy, self.sampled, len(ok))
        if withheld := self.account.exceeds(rnd, self.released_at):
            self.released_at, self.withheld = None, withheld
            tqdm.write(f"fedvision: {withheld}; round {rnd} is not released", file=sys.stderr)
            return False
        return True

    def after_aggregate(self, aggregated: bool) -> None:
        """Compose the release into the account (nothing was released without an aggregate)."""
        if aggregated and self.released_at is not None:
            self.account.step(self.released_at)
        else:
            self.released_at = None

    def record(self, rnd: int, ok: Sequence[Message]) -> dict[str, Any]:
        """Epsilon so far, releases, the round's multiplier, DP-SGD's largest epsilon."""
        out = privacy_record(self.account, ok, self.released_at)
        if self.withheld:
            out["dp_withheld"] = self.withheld
        return out

    def checkpoint(self) -> dict[str, Any]:
        """DP-SGD's steps per client: a resumed run's epsilon continues from them."""
        return {"dpsgd_steps": dict(self.dpsgd_steps)}

    def summary(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The run's privacy (empty without DP)."""
        return privacy_summary(self.cfg, self.account, records, None)
