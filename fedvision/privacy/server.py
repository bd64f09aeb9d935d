"""Privacy on the server: Flower's DP wrapper around the strategy, and the round loop's hook.

Client-level DP (McMahan et al. 2018, Andrew et al. 2021) is one of Flower 1.39's strategy
wrappers (``privacy.wrapper._target_``) around the configured strategy, inside fedvision's
seeded sampling: ``SeededSampling(DifferentialPrivacy...(FedAvg))``. The wrapper clips each update
(on the server, or on the clients with Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``:
:mod:`fedvision.privacy.client`) and adds Gaussian noise of std
``noise_multiplier * clipping_norm / num_sampled_clients`` to the aggregate. That std is
calibrated to a *plain* mean of clipped updates, so under client-level DP:

- the inner strategy must aggregate with ``FedAvg.aggregate_train`` (FedAvg, FedProx); server
  optimisers, robust and fair aggregators compute something else and are refused;
- every client's weight is equal: clients reply ``num-examples = 1`` (their real count travels as
  ``num-train``) and the server refuses a round whose replies say otherwise.

:class:`PrivacyRound` is the feature hook of the round loop: the account and the budget of
client-level DP, and each client's DP-SGD steps (sample-level DP runs inside the clients,
:mod:`fedvision.privacy.dpsgd`; the server only sends its settings in the round config).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, Strategy
from hydra.utils import instantiate
from tqdm import tqdm

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.fl.checkpoint import strategy_chain
from fedvision.fl.feature import Feature
from fedvision.privacy.accounting import (
    SAMPLING_ASSUMPTION,
    ClientLevelAccountant,
    effective_noise_multiplier,
)
from fedvision.privacy.plan import MODES, PrivacyPlan


def wrap_strategy(cfg: Mapping[str, Any], strategy: Strategy) -> Strategy:
    """``strategy`` inside the configured Flower DP wrapper (unchanged without client-level DP)."""
    plan = PrivacyPlan.from_config(cfg)
    cls = plan.wrapper
    if cls is None:
        return strategy
    if not isinstance(strategy, FedAvg) or (
        type(strategy).aggregate_train is not FedAvg.aggregate_train
    ):
        raise FedvisionError(
            f"privacy wrapper {cls.__name__} calibrates its noise to a plain mean of clipped "
            f"updates, which {type(strategy).__name__} does not compute: use strategy=fedavg or "
            "fedprox with client-level DP"
        )
    wrapper = dict(plan.wrapper_args)
    m = plan.num_sampled_clients
    given = wrapper.pop("num_sampled_clients", None)
    if given is not None and int(given) != m:
        raise FedvisionError(
            f"privacy.wrapper.num_sampled_clients={given}, but the strategy samples {m} clients "
            "per round; leave it out (fedvision sets it)"
        )
    z = plan.noise_multiplier
    if not (math.isfinite(z) and z >= 0):
        raise FedvisionError(f"privacy.wrapper.noise_multiplier={z} must be >= 0")
    norm = plan.clipping_norm
    if not (math.isfinite(norm) and norm > 0):
        raise FedvisionError(f"privacy.wrapper.{plan.norm_key}={norm} must be > 0")
    try:
        return instantiate(wrapper, strategy=strategy, num_sampled_clients=m)
    except Exception as exc:  # Flower's own checks raise ValueError, wrapped by Hydra
        cause = exc.__cause__ or exc
        raise FedvisionError(f"privacy.wrapper: {cause}".splitlines()[0]) from exc


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
    # One float64 buffer for every reply: a fresh 90 MB difference per reply (resnet18) cost
    # more in page faults than the arithmetic (0.2-0.4 s a round on 2 cores, scripts/bench_sim.py).
    # sqrt(d . d) is what np.linalg.norm computes for a vector: the same numbers.
    diff = np.empty_like(base)
    norms = []
    for m in replies:
        if not m.has_error():
            np.subtract(m.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy(), base, out=diff)
            norms.append(float(np.sqrt(diff.dot(diff))))
    return norm_record(norms, clipping_norm)


def norm_record(norms: Sequence[float], clipping_norm: float | None) -> dict[str, Any]:
    """The update-norm figures of :func:`update_norm_record` from the norms themselves."""
    if not norms:
        return {}
    out: dict[str, Any] = {
        "update_norm_median": float(np.median(norms)),
        "update_norm_max": max(norms),
    }
    if clipping_norm is not None:
        out["clipped_fraction"] = sum(n > clipping_norm for n in norms) / len(norms)
    return out


def release_noise_multiplier(strategy: Strategy, sampled: int, replied: int) -> float:
    """The multiplier the DP wrapper in ``strategy``'s chain releases ``replied`` updates at."""
    wrapper = next(s for s in strategy_chain(strategy) if type(s) in MODES)
    # Adaptive wrappers keep the update's share z_u in noise_multiplier, and the count's noise.
    return effective_noise_multiplier(
        wrapper.noise_multiplier, sampled, replied, getattr(wrapper, "clipped_count_stddev", None)
    )


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
    plan: PrivacyPlan,
    account: ClientLevelAccountant | None,
    records: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """The run's privacy in ``summary.json`` (empty without DP).

    ``epsilon`` is the final client-level epsilon, else the largest DP-SGD epsilon any client
    reported; ``privacy`` says which level, at which delta, under which sampling assumption.
    """
    dpsgd = plan.dpsgd
    if account is None and dpsgd is None:
        return {}
    info: dict[str, Any] = {"delta": plan.delta}
    out: dict[str, Any] = {"privacy": info}
    if account is not None:
        info.update(
            level="client",
            mode=plan.mode,
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
    if dpsgd is not None:
        eps_dpsgd = [r["dpsgd_epsilon_max"] for r in records if "dpsgd_epsilon_max" in r]
        info["dpsgd"] = {
            "noise_multiplier": dpsgd.noise_multiplier,
            "max_grad_norm": dpsgd.max_grad_norm,
            "epsilon_max": max(eps_dpsgd) if eps_dpsgd else None,
            "sampling": "Poisson batches of expected size client.batch_size (as the RDP analysis)",
        }
        if account is None:
            info["level"] = "sample"
            out["epsilon"] = info["dpsgd"]["epsilon_max"]
    return out


class PrivacyRound(Feature):
    """Privacy in the round loop: client-level DP's account and DP-SGD's steps per client.

    Every round's config says which client-level mode is on (``none`` without DP). Under
    client-level DP a round is released only while the budget allows, at the noise multiplier
    its replies give, and every reply must weigh 1; under DP-SGD each client's steps so far
    travel to it (its epsilon survives a resume) and are kept in the checkpoint.
    """

    def __init__(
        self, plan: PrivacyPlan, account: ClientLevelAccountant | None, steps: Mapping
    ) -> None:
        self.privacy = plan  # not `self.plan`: that is a Feature hook
        self.account = account
        self.dpsgd_steps = {int(k): int(v) for k, v in steps.items()}
        self.released_at: float | None = None  # the multiplier this round is released at
        self.withheld: str | None = None

    @classmethod
    def build(
        cls, cfg: Mapping[str, Any], history: Sequence[Mapping[str, Any]], resumed: Any
    ) -> PrivacyRound:
        """The hook for a run; a resumed run continues its account and DP-SGD steps."""
        plan = PrivacyPlan.from_config(cfg)
        steps = resumed.dpsgd_steps if resumed is not None else {}
        return cls(plan, plan.accountant(history), steps)

    def stop(self, rnd: int) -> str | None:
        """The budget's reason to stop before round ``rnd``, if releasing it would pass it."""
        return None if self.account is None else self.account.next_round_exceeds(rnd)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """The privacy settings the clients need, and each client's DP-SGD steps so far."""
        self.released_at, self.withheld = None, None
        out: dict[str, Any] = dict(self.privacy.round_config())
        if self.privacy.dpsgd is not None:
            n = self.privacy.num_clients
            out[C.KEY_DPSGD_PRIOR] = [int(self.dpsgd_steps.get(p, 0)) for p in range(n)]
        return out

    def replied(self, ok: Sequence[Message], partition_of: Mapping[int, int]) -> None:
        """Each client's DP-SGD steps so far, late replies' included (they trained)."""
        for m in ok:
            if C.KEY_DPSGD_STEPS in m.content[C.KEY_METRICS]:
                pid = partition_of[m.metadata.src_node_id]
                self.dpsgd_steps[pid] = int(m.content[C.KEY_METRICS][C.KEY_DPSGD_STEPS])

    def release(
        self, rnd: int, ok: Sequence[Message], strategy: Strategy, clients: int | None = None
    ) -> bool:
        """Whether the round's noisy aggregate stays within the budget (always without DP).

        ``clients``: how many clients ``ok`` stands for, where a reply is a cohort's mean (its
        worker weighed each client 1); ``None``: one client a reply, each must weigh 1.
        """
        if self.account is None:
            return True
        if clients is None:
            check_equal_weights(ok)
        # Flower's wrappers keep the noise of `sampled` replies for fewer: account for it.
        sampled = self.privacy.num_sampled_clients
        replied = len(ok) if clients is None else clients
        self.released_at = release_noise_multiplier(strategy, sampled, replied)
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
        return privacy_summary(self.privacy, self.account, records)
