"""Secure aggregation (SecAgg+): config checks, app choice, and its rounds for the round loop.

Flower 1.39 offers SecAgg+ (Bell et al., CCS 2020) only on its legacy API: the server runs
``SecAggPlusWorkflow`` with a legacy ``flwr.server.strategy`` and a ``LegacyContext``; each
client runs ``secaggplus_mod`` in front of its train handler. fedvision's round loop
(:func:`fedvision.fl.loop.run_rounds`) runs the workflow once per round in place of the
Message-API exchange (:class:`SecureRounds`); evaluation, records, checkpoints and resume are the
loop's. The client side is its own ClientApp (``secagg_clientapp``), picked by the ``secagg``
config group. What SecAgg+ cannot do is refused by :func:`check_secagg` before any work.

Weighting: each client uploads ``[r_i, r_i * u_i]`` quantised and masked, where ``u_i`` is its
update and ``r_i = round(n_i / max_weight * Q) / Q`` its example count over ``max_weight``; the
workflow unmasks the two sums and divides, so the example-weighted mean is folded into the secure
sum. fedvision sets ``max_weight`` to the largest client's training-set size, so ``r_i <= 1``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from tqdm import tqdm

from fedvision import constants as C
from fedvision.data.partition import load_partition
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import layout_of, unpack
from fedvision.fl.feature import Feature, Trained
from fedvision.fl.parts import local_bn, merge, run_parts, subset, travelling
from fedvision.privacy.plan import client_level_mode, num_sampled_clients
from fedvision.rundir import RunPlan
from strategies.update_fedavg import FedAvgOfUpdates

DEFAULT_APPS = ("fedvision.fl.serverapp:app", "fedvision.fl.clientapp:app")
# SecAgg+ runs the same ServerApp (its round loop picks SecureRounds) and its own ClientApp.
SECAGG_APPS = ("fedvision.fl.serverapp:app", "fedvision.fl.secagg_clientapp:app")
FEDAVG = "flwr.serverapp.strategy.FedAvg"
WORKFLOW_KEYS = (
    "num_shares",
    "reconstruction_threshold",
    "clipping_range",
    "quantization_range",
    "modulus_range",
    "timeout",
)


def secagg_settings(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``secagg`` group's keys, or None under ``secagg=none`` (and runs saved before it)."""
    settings = cfg.get("secagg") or {}
    return dict(settings) if settings else None


def flower_apps(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """``module:attr`` of the ServerApp and ClientApp a run uses (SecAgg+ has its own pair)."""
    return SECAGG_APPS if secagg_settings(cfg) is not None else DEFAULT_APPS


def build_workflow(
    settings: Mapping[str, Any], max_weight: float, timeout: float | None
) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow for ``settings``; its own checks become one-line errors."""
    try:
        return SecAggPlusWorkflow(
            num_shares=settings["num_shares"],
            reconstruction_threshold=settings["reconstruction_threshold"],
            max_weight=float(max_weight),
            clipping_range=float(settings["clipping_range"]),
            quantization_range=settings["quantization_range"],
            modulus_range=settings["modulus_range"],
            timeout=timeout,
        )
    except (TypeError, ValueError) as exc:
        raise FedvisionError(f"secagg: {str(exc).strip('`')}".replace("`", "")) from exc


def check_secagg(cfg: Mapping[str, Any], runtime: str | None = None) -> None:
    """Refuse what the SecAgg+ app cannot run, one line each (before any data work).

    ``runtime`` is the runtime's name (``simulation``, ...); None skips that check (the server).
    """
    s = secagg_settings(cfg)
    if s is None:
        return
    unknown = sorted(set(s) - set(WORKFLOW_KEYS))
    if unknown:
        raise FedvisionError(f"secagg has no key {unknown[0]!r} (keys: {', '.join(WORKFLOW_KEYS)})")
    refusals = [
        (
            runtime is not None and runtime != "simulation",
            f"secagg=secaggplus runs on runtime=simulation only, not runtime={runtime} (a "
            "deployment's SuperNodes run the ClientApp pyproject.toml names, without the mod)",
        ),
        (
            str(cfg["strategy"].get("_target_")) != FEDAVG,
            f"secagg=secaggplus aggregates with FedAvg only (strategy=fedavg), not "
            f"{cfg['strategy'].get('_target_')}",
        ),
        (
            client_level_mode(cfg) != "none" or bool((cfg.get("privacy") or {}).get("dpsgd")),
            "secagg=secaggplus does not combine with differential privacy yet: set privacy=none",
        ),
        (
            bool(cfg.get("system")),
            "secagg=secaggplus does not simulate system heterogeneity: set system=none",
        ),
        (
            local_bn(cfg),
            "secagg=secaggplus does not support FedBN: set client.local_bn=false",
        ),
        (
            float(cfg["strategy"].get("fraction_evaluate", 0.0)) > 0,
            "secagg=secaggplus evaluates centrally only: set strategy.fraction_evaluate=0",
        ),
    ]
    for refused, reason in refusals:
        if refused:
            raise FedvisionError(reason)
    m = num_sampled_clients(cfg)
    if m < 2:
        raise FedvisionError(
            f"secagg=secaggplus needs at least 2 clients per round (this config trains {m}): "
            "the sum of one update is that update"
        )
    for key in ("num_shares", "reconstruction_threshold"):
        value = s[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > m:
            raise FedvisionError(
                f"secagg.{key}={value} but a round trains only {m} clients; lower it or raise "
                "num_clients / strategy.fraction_train"
            )
    q, mod = int(s["quantization_range"]), int(s["modulus_range"])
    if m * q >= mod:
        raise FedvisionError(
            f"secagg: {m} clients per round * quantization_range={q} reach modulus_range={mod}: "
            "the masked sum would wrap around; lower quantization_range or raise modulus_range"
        )
    if float(s["clipping_range"]) <= 0:
        raise FedvisionError(f"secagg.clipping_range={s['clipping_range']} must be > 0")
    if s["timeout"] is not None and float(s["timeout"]) <= 0:
        raise FedvisionError(f"secagg.timeout={s['timeout']} must be > 0 (or null)")
    build_workflow(s, max_weight=1.0, timeout=None)  # Flower's own checks of the rest


def quantisation_bound(
    clipping_range: float, quantization_range: int, ratios: list[float], max_abs_update: float
) -> float:
    """Largest difference between the SecAgg+ aggregate and FedAvg's mean, per value.

    Each client's weighted value ``r_i u_i`` is stochastically rounded to a step of ``2c/Q``
    (error < one step), and its ratio ``r_i`` to a step of ``1/Q`` (error <= ``1/(2Q)``, moving
    the mean by at most ``|r_i - r'_i| * 2 max|u|``). Holds when no value was clipped.
    """
    m, q = len(ratios), float(quantization_range)
    total = sum(round(r * q) / q for r in ratios)
    return (m * 2 * clipping_range / q + m * max_abs_update / q) / total


class SecureRounds(Feature):
    """A round under SecAgg+, for :func:`fedvision.fl.loop.run_rounds`: Flower's workflow trains it.

    The loop configures, evaluates, records and checkpoints as in any run; only the exchange and
    the aggregate are ``SecAggPlusWorkflow``'s, one call per round through a ``LegacyContext``
    whose client manager holds the nodes of the loop's client directory. The strategy
    (``FedAvgOfUpdates``) samples by partition id as the Message-API strategies do, and adds the
    unmasked mean update to the global model.
    """

    def __init__(self, cfg: Mapping[str, Any], settings: Mapping[str, Any], plan: RunPlan) -> None:
        self.settings = dict(settings)
        self.parts = run_parts(cfg, plan.num_classes)
        partition = load_partition(Path(plan.partition_file))
        # The weight of the largest client maps to ratio 1: every r_i <= 1, none overflows.
        self.max_weight = max(1, max(len(t) for t in partition.train))
        scfg, n = cfg["strategy"], int(cfg["num_clients"])
        self.config: dict[str, Scalar] = {}  # this round's train config, for on_fit_config_fn
        self.fit: dict[str, Any] | None = None  # set when the round's aggregate was made
        self.strategy = FedAvgOfUpdates(
            seed=int(cfg["seed"]),  # round r trains the same partitions in every run
            wait_timeout_s=plan.connect_timeout_s,
            fraction_fit=float(scfg.get("fraction_train", 1.0)),
            fraction_evaluate=0.0,
            min_fit_clients=max(2, int(scfg.get("min_train_nodes", 2))),
            min_evaluate_clients=0,
            # Every client is up before round 1, as in the Message-API rounds.
            min_available_clients=max(n, int(scfg.get("min_available_nodes", 2))),
            on_fit_config_fn=lambda rnd: self.config,
            fit_metrics_aggregation_fn=self._fit_metrics,
        )
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=int(cfg["num_rounds"])), strategy=self.strategy
        )
        timeout = settings["timeout"] if settings["timeout"] is not None else plan.round_timeout_s
        self.workflow = build_workflow(settings, self.max_weight, float(timeout))

    @classmethod
    def build(cls, cfg: Mapping[str, Any], plan: RunPlan) -> SecureRounds | None:
        """The SecAgg+ rounds of a ``secagg=secaggplus`` run, else None."""
        settings = secagg_settings(cfg)
        if settings is None:
            return None
        check_secagg(cfg)
        return cls(cfg, settings, plan)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """SecAgg+'s scale and clipping range, which the client counts its clipped values with."""
        return {
            C.KEY_SERVER_ROUND: rnd,
            C.KEY_SECAGG_MAX_WEIGHT: float(self.max_weight),
            C.KEY_SECAGG_CLIP: float(self.settings["clipping_range"]),
        }

    def summary(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The protocol's settings and the weight that maps to ratio 1."""
        return {"secagg": {**self.settings, "max_weight": self.max_weight}}

    def _fit_metrics(self, results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        """Example-weighted train loss/accuracy of the round's clients (their metrics are plain)."""
        total = sum(n for n, _ in results) or 1
        self.fit = {
            "train_loss": sum(n * float(m[C.KEY_TRAIN_LOSS]) for n, m in results) / total,
            "train_accuracy": sum(n * float(m[C.KEY_TRAIN_ACC]) for n, m in results) / total,
            "num_clients": len(results),
            "secagg_clipped": sum(int(m.get(C.KEY_SECAGG_CLIPPED, 0)) for _, m in results),
        }
        return {"train_loss": self.fit["train_loss"], "train_accuracy": self.fit["train_accuracy"]}

    def _sync_nodes(self, grid: Grid, partition_of: Mapping[int, int]) -> None:
        """Give the legacy client manager exactly the nodes the loop's directory holds."""
        manager, run_id = self.legacy.client_manager, grid.run.run_id
        held = manager.all()
        for cid in set(held) - {str(n) for n in partition_of}:
            manager.unregister(held[cid])
        for node in sorted(partition_of):
            if str(node) not in held:
                manager.register(GridClientProxy(node, grid, run_id))
        self.strategy.set_partitions(partition_of)

    def train(
        self,
        grid: Grid,
        rnd: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        partition_of: Mapping[int, int],
    ) -> Trained:
        """Round ``rnd`` of the protocol from the global model ``arrays``."""
        self._sync_nodes(grid, partition_of)
        self.config, self.fit = dict(config), None
        state = self.legacy.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd, WorkflowKey.START_TIME: time.time()}
        )
        # SecAgg+ sums every array it is given, weighted by example count: parameters and
        # BatchNorm statistics travel as two masked arrays (FedAvg is the only rule here).
        sent = travelling(arrays, self.parts)
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(sent), keep_input=True
        )
        self.workflow(grid, self.legacy)
        sampled, fit = list(self.strategy.sampled), self.fit
        if fit is None:  # the protocol halted: too few clients or shares
            tqdm.write(
                f"fedvision: secagg: round {rnd} did not aggregate (SecAgg+ halted: too few "
                "clients or shares); the global model stays",
                file=sys.stderr,
            )
            entries = {"num_clients": 0, "num_failures": len(sampled), "clients": sampled}
            return Trained(arrays, None, {**entries, "aggregated": False})
        received = compat.arrayrecord_to_parameters(
            state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        travelled = [k for k in (self.parts.shared, self.parts.stats) if k]
        for flat, keys in zip(parameters_to_ndarrays(received), travelled, strict=True):
            packed = ArrayRecord({C.KEY_FLAT: Array(np.asarray(flat, dtype=np.float32))})
            arrays = merge(arrays, unpack(packed, layout_of(subset(arrays, keys))))
        entries = {
            "num_clients": fit["num_clients"],
            "num_failures": len(sampled) - fit["num_clients"],
            "clients": sampled,
            "secagg_clipped": fit["secagg_clipped"],
        }
        metrics = {C.KEY_TRAIN_LOSS: fit["train_loss"], C.KEY_TRAIN_ACC: fit["train_accuracy"]}
        return Trained(arrays, metrics, entries)
