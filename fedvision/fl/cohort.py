"""Cohort execution: a few worker nodes each train many of a round's clients back to back.

Flower's simulation runs one Ray task per client per message: about 30 ms and a copy of the
model each way per client (``../shared/FLOWER-NOTES.md``), which decides the throughput when a
client's work is a fraction of a second (the cross-device regime: 1,000 clients of 50 images).
With ``runtime.cohort_workers=W`` the simulation starts W nodes instead of one per partition;
each round the strategy samples partitions as always (over a virtual population, so the draw is
the one a per-client run makes), the sample is split into W cohorts balanced by example count,
and each worker trains its cohort one client after another on its resident model, each from the
global model, and replies with the cohort's example-weighted mean and example total.

That reply is an exact stand-in for its clients only where the strategy's aggregate depends on
them through the example-weighted mean of their weights and metrics: FedAvg, FedProx, and the
server optimisers over that mean (FedAvgM, FedAdam, FedYogi, FedAdagrad). FedNova depends on
them through two such means, of the normalised updates ``d_i = (x - y_i) / a_i`` and of the
work ``a_i``: a worker replies ``y_c = x - a_c * d_c`` with ``a_c`` as its plain-SGD steps, so
that FedNova's ``tau_eff = sum_c p_c a_c`` and ``sum_c p_c (x - y_c) / a_c`` over the cohorts are
its sums over the clients. SCAFFOLD depends on them through plain means of models and
control-variate changes: a worker replies those with its client count, and keeps each
client's ``c_i`` in the run directory's client-state folder (:mod:`fedvision.fl.client_state`),
since any worker may train the client next. Everything else is refused by :func:`check_cohort`
before any work (rules that need each update, FedBN, adaptive clipping, DP-SGD, SecAgg+,
federated evaluation). Per-client results
(who trained, example counts, losses, update norms, failures with their reasons) travel beside
the mean in a ConfigRecord and are recorded as in a per-client run.

Client-level DP with a fixed clipping norm (``privacy=client_fixed`` or ``server_fixed``) stays
exact: each worker clips each client's update before summing and weighs every client 1, so the
cohorts' means, weighed by their client counts, are the plain mean of clipped updates that
Flower's wrapper then noises for the sampled clients. Server-side clipping of a cohort's mean is
a no-op: a mean of updates of norm at most C has norm at most C.

Simulated devices (``system``) plan each client on a virtual message, the one a per-client run
would send it: dropouts are not sent, and each client's step cap and epochs travel in its
cohort's config. Under a deadline with ``deadline_policy=drop`` each client's simulated
transfer time and speed travel too: a worker times each client as the server's clock does and
leaves a late one out of its mean (it trained, and its work is reported). The clock then times
one virtual reply per trained client; the clients it accepts must be the ones kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvision import constants as C
from fedvision.data.partition import load_partition
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import message_bytes, pack
from fedvision.fl.directory import exchange, say_failures
from fedvision.fl.feature import Feature, Trained
from fedvision.fl.parts import (
    apply_aggregate,
    local_bn,
    packed_stats,
    subset,
    take_stats,
    with_stats,
)
from fedvision.models import ModelParts
from fedvision.privacy.plan import PrivacyPlan
from fedvision.privacy.server import norm_record
from fedvision.rundir import RunPlan
from fedvision.system.round import SystemRound

COHORT_CLIENT_APP = "fedvision.fl.cohort_clientapp:app"
# Strategies whose aggregate sees the clients only through their example-weighted mean.
MEAN_STRATEGIES = tuple(
    f"flwr.serverapp.strategy.{name}"
    for name in ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad")
)
# And the one that sees them through example-weighted means of normalised updates and work.
FEDNOVA = "strategies.fednova.FedNova"
# And the one that sees them through plain means of models and control-variate changes.
SCAFFOLD = "strategies.scaffold.Scaffold"

# Client-level DP modes a worker applies exactly (a fixed norm each client's update is clipped to).
CLIPPED_MODES = ("none", "client-fixed", "server-fixed")


def cohort_workers(cfg: Mapping[str, Any]) -> int:
    """``runtime.cohort_workers`` of a launch config (0: one node per partition)."""
    return int((cfg.get("runtime") or {}).get("cohort_workers") or 0)


def check_cohort(cfg: Mapping[str, Any], runtime: str) -> None:
    """Refuse, one line each, what a cohort's mean cannot stand in for (before any work)."""
    workers = cohort_workers(cfg)
    if workers == 0:
        return
    refusals = [
        (workers < 0, f"runtime.cohort_workers={workers} must be >= 0 (0: one node per client)"),
        (runtime != "simulation", f"cohort execution is a simulation mode, not runtime={runtime}"),
        (
            str(cfg["strategy"].get("_target_")) not in (*MEAN_STRATEGIES, FEDNOVA, SCAFFOLD),
            f"cohort execution needs a strategy that aggregates means of the clients "
            f"(fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, fednova, scaffold), not "
            f"{cfg['strategy'].get('_target_')}: set runtime.cohort_workers=0",
        ),
        (
            PrivacyPlan.from_config(cfg).mode not in CLIPPED_MODES,
            "cohort execution combines with client-level DP at a fixed clipping norm only "
            "(privacy=client_fixed or server_fixed), not adaptive clipping: set "
            "runtime.cohort_workers=0",
        ),
        (
            bool((cfg.get("privacy") or {}).get("dpsgd")),
            "cohort execution does not run DP-SGD yet: set runtime.cohort_workers=0",
        ),
        (bool(cfg.get("secagg")), "cohort execution does not run SecAgg+: set secagg=none"),
        (
            local_bn(cfg),
            "cohort execution does not run FedBN, which keeps BatchNorm on each client and is "
            "evaluated there: set client.local_bn=false or runtime.cohort_workers=0",
        ),
        (
            float(cfg["strategy"].get("fraction_evaluate", 0.0)) > 0,
            "cohort execution evaluates centrally only: set strategy.fraction_evaluate=0",
        ),
    ]
    for refused, reason in refusals:
        if refused:
            raise FedvisionError(reason)


def split_cohorts(pids: Sequence[int], sizes: Sequence[int], workers: int) -> list[list[int]]:
    """``pids`` in ``workers`` cohorts of about equal examples (largest first to the lightest).

    Deterministic: ties go to the lower worker, and each cohort is in partition order.
    """
    load = [0] * workers
    cohorts: list[list[int]] = [[] for _ in range(workers)]
    for pid in sorted(pids, key=lambda p: (-sizes[p], p)):
        w = min(range(workers), key=lambda i: (load[i], i))
        cohorts[w].append(pid)
        load[w] += sizes[pid]
    return [sorted(c) for c in cohorts]


class Population:
    """A grid of one virtual node per partition (node id = partition id), for sampling only."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def get_node_ids(self) -> list[int]:
        """Every partition, connected."""
        return list(range(self.num_clients))


class CohortRounds:
    """A round in cohorts, for :func:`fedvision.fl.loop.run_rounds` (see the module docstring)."""

    def __init__(
        self, cfg: Mapping[str, Any], plan: RunPlan, strategy: Strategy, parts: ModelParts,
        layouts: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]], timeout: float,
        hooks: Sequence[Feature] = (),
    ) -> None:  # fmt: skip
        self.strategy, self.parts, self.timeout = strategy, parts, timeout
        self.layouts = layouts
        self.workers = int(plan.cohort_workers)
        self.num_clients = int(cfg["num_clients"])
        self.sizes = [len(t) for t in load_partition(Path(plan.partition_file)).train]
        self.min_replies = int(cfg.get("min_train_replies", 1))
        self.hooks = hooks
        privacy = PrivacyPlan.from_config(cfg)
        self.dp_mode = privacy.mode
        self.clip = privacy.clipping_norm if privacy.mode != "none" else None
        self.normalise = str(cfg["strategy"].get("_target_")) == FEDNOVA
        self.identity = {p: p for p in range(self.num_clients)}  # virtual node id = partition
        self.system = next((h for h in hooks if isinstance(h, SystemRound)), None)
        if str(cfg["strategy"].get("_target_")) == SCAFFOLD and not plan.client_state_dir:
            # Any worker may train a client next: its c_i must be where every worker looks.
            raise FedvisionError(
                "SCAFFOLD in cohorts keeps each client's c_i in the run directory, but the run "
                "plan names no client-state folder: prepare the run with runtime=simulation"
            )

    @classmethod
    def build(
        cls, cfg: Mapping[str, Any], plan: RunPlan, strategy: Strategy, parts: ModelParts,
        layouts: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]], timeout: float,
        hooks: Sequence[Feature] = (),
    ) -> CohortRounds | None:  # fmt: skip
        """The cohort rounds of a run whose plan has cohort workers, else None.

        Of the features' hooks (:func:`check_cohort` leaves privacy and simulated devices)
        these rounds call ``plan`` (on one virtual message per client), ``release`` (with the
        number of clients), ``after_aggregate`` and ``record``; the simulated clock's ``settle``
        is called by :meth:`_settle`.
        """
        if not plan.cohort_workers:
            return None
        return cls(cfg, plan, strategy, parts, layouts, timeout, hooks)

    def _cohort_config(
        self, base: Mapping[str, Any], cohort: Sequence[int], own: Mapping[int, Message]
    ) -> ConfigRecord:
        """The train config of one cohort: the round's, its clients, and what they need."""
        extra: dict[str, Any] = {C.KEY_COHORT: list(cohort)}
        if self.clip is not None:
            extra[C.KEY_COHORT_CLIP] = self.clip
        if self.normalise:
            extra[C.KEY_COHORT_NORMALISE] = True
        if self.system is not None:  # each client's own work, and its clock under a deadline
            configs = [own[p].content[C.KEY_CONFIG] for p in cohort]
            extra[C.KEY_COHORT_LOCAL_STEPS] = [int(c[C.KEY_LOCAL_STEPS]) for c in configs]
            extra[C.KEY_COHORT_LOCAL_EPOCHS] = [int(c[C.KEY_LOCAL_EPOCHS]) for c in configs]
            model = self.system.model
            if model.cfg.deadline_s is not None and model.cfg.deadline_policy == "drop":
                # A client's reply weighs what its message does (the same packed parts).
                sizes = [message_bytes([own[p]]) for p in cohort]
                extra[C.KEY_COHORT_TRANSFER] = [
                    model.profiles[p].transfer_s(b, b) for p, b in zip(cohort, sizes, strict=True)
                ]
                extra[C.KEY_COHORT_SPEED] = [model.profiles[p].speed for p in cohort]
                extra[C.KEY_COHORT_DEADLINE] = float(model.cfg.deadline_s)
        return ConfigRecord({**base[C.KEY_CONFIG], **extra})

    def _settle(
        self, own: Mapping[int, Message], work: Mapping[int, tuple[int, int]], trained: int
    ) -> dict[str, Any]:
        """The simulated clock's record of the round (empty without ``system``).

        The clock sees one virtual reply per client that trained, of the size its reply would
        have; the clients it accepts must be those the workers kept in their means.
        """
        if self.system is None:
            return {}
        replies = []
        for pid, (steps, samples) in work.items():
            sent = own[pid].content
            content = RecordDict({k: v for k, v in sent.array_records.items()})
            metrics = {C.KEY_STEPS: int(steps), C.KEY_TRAIN_SAMPLES: int(samples)}
            content[C.KEY_METRICS] = MetricRecord(metrics)
            replies.append(Message(content=content, reply_to=own[pid]))
        accepted, record = self.system.settle(replies, self.identity)
        if len(accepted) != trained:
            raise FedvisionError(
                f"the simulated clock accepts {len(accepted)} clients but the cohort workers "
                f"kept {trained} in their means: the workers run another fedvision version"
            )
        return record

    def train(
        self,
        grid: Grid,
        rnd: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        partition_of: Mapping[int, int],
    ) -> Trained:
        """Round ``rnd`` from ``arrays``; ``partition_of`` maps worker nodes to worker indices."""
        shared = pack(subset(arrays, self.parts.shared))
        stats = packed_stats(arrays, self.parts)
        # The strategy samples and configures over the whole population, as in a per-client run.
        self.strategy.set_partitions(self.identity)
        sampled = list(
            self.strategy.configure_train(rnd, shared, config, Population(self.num_clients))
        )
        pids = sorted(m.metadata.dst_node_id for m in sampled)
        base = dict(sampled[0].content.items()) if sampled else {}  # the same for every client
        if stats is not None:
            base[C.KEY_BN_STATS] = stats
            sampled = with_stats(sampled, stats)
        # One virtual message per client: what a per-client run would send it (simulated devices
        # drop clients here and give each its own work).
        for h in self.hooks:
            sampled = h.plan(rnd, sampled, self.identity)
        own = {m.metadata.dst_node_id: m for m in sampled}
        nodes = sorted(partition_of, key=lambda n: partition_of[n])
        messages = []
        for node, cohort in zip(
            nodes, split_cohorts(sorted(own), self.sizes, len(nodes)), strict=True
        ):
            if cohort:
                content = {**base, C.KEY_CONFIG: self._cohort_config(base, cohort, own)}
                msg = Message(
                    content=RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN
                )
                messages.append(msg)
        replies = exchange(grid, messages, self.timeout) if messages else []
        by_node = {m.metadata.src_node_id: m for m in replies}

        ok, failures, norms, trained, work = [], [], [], 0, {}
        for msg in messages:
            cohort = list(msg.content[C.KEY_CONFIG][C.KEY_COHORT])
            reply = by_node.get(msg.metadata.dst_node_id)
            if reply is None or reply.has_error():
                reason = "no reply within runtime.round_timeout_s"
                if reply is not None:
                    lines = (reply.error.reason or "").strip().splitlines()
                    reason = lines[-1] if lines else f"error code {reply.error.code}"
                failures += [{"partition": p, "code": None, "reason": reason} for p in cohort]
                continue
            report = reply.content.config_records[C.KEY_COHORT_REPORT]
            why = zip(report[C.KEY_COHORT_FAILED], report[C.KEY_COHORT_REASONS], strict=True)
            failures += [{"partition": int(p), "code": None, "reason": str(r)} for p, r in why]
            norms += [float(x) for x in report[C.KEY_COHORT_NORMS]]
            steps = zip(report[C.KEY_COHORT_STEPS], report[C.KEY_COHORT_SAMPLES], strict=True)
            work.update(zip((int(p) for p in report[C.KEY_COHORT_TRAINED]), steps, strict=True))
            done = len(report[C.KEY_COHORT_NORMS])
            trained += done
            if done:  # the strategy sees the cohort's mean as one reply, nothing else
                content = dict(reply.content.items())
                content.pop(C.KEY_COHORT_REPORT)
                ok.append(Message(content=RecordDict(content), reply_to=msg))
        failures.sort(key=lambda f: f["partition"])
        if not work and messages:
            first = failures[0]["reason"] if failures else "no reply"
            raise FedvisionError(f"round {rnd}: every client failed; first: {first}")
        settled = self._settle(own, work, trained)
        if failures:
            say_failures(rnd, failures, len(own), trained, self.min_replies)

        bytes_down, bytes_up = message_bytes(messages), message_bytes(ok)
        client_stats = take_stats(ok)
        aggregate = trained >= self.min_replies
        aggregate = aggregate and all(
            [h.release(rnd, ok, self.strategy, trained) for h in self.hooks]
        )
        metrics, new_arrays = None, None
        if aggregate:
            with _quiet_reply_count(self.dp_mode != "none"):
                new_arrays, metrics = self.strategy.aggregate_train(rnd, ok)
            arrays = apply_aggregate(arrays, new_arrays, client_stats, self.layouts)
        for h in self.hooks:
            h.after_aggregate(new_arrays is not None)
        record: dict[str, Any] = {
            "num_clients": trained,
            "num_failures": len(failures),
            "clients": pids,
            "bytes_down": int(bytes_down),
            "bytes_up": int(bytes_up),
            "cohorts": len(messages),
            **settled,
        }
        # The norms a per-client run records: of what the server receives (clipped on the
        # clients under client_fixed) and, under server_fixed, the share it clipped.
        if self.dp_mode == "client-fixed":
            record.update(norm_record([min(n, self.clip) for n in norms], None))
        else:
            record.update(norm_record(norms, self.clip))
        for h in self.hooks:
            record.update(h.record(rnd, ok))
        if failures:
            record["failures"] = failures
        if not aggregate:
            record["aggregated"] = False
        return Trained(arrays, metrics, record)


@contextmanager
def _quiet_reply_count(dp: bool) -> Iterator[None]:
    """Drop Flower's DP warning that fewer replies came than clients were sampled.

    A cohort's reply stands for all its clients, so the count it compares is always lower; the
    real shortfall (failed clients) is said by :func:`~fedvision.fl.directory.say_failures` and
    accounted for by the privacy hook.
    """

    def keep(rec: logging.LogRecord) -> bool:
        return "differs from the number of sampled clients" not in rec.getMessage()

    if dp:
        FLOWER_LOGGER.addFilter(keep)
    try:
        yield
    finally:
        if dp:
            FLOWER_LOGGER.removeFilter(keep)
