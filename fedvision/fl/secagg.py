"""Secure aggregation (SecAgg+): config checks, app choice, and the server's round loop.

Flower 1.39 offers SecAgg+ (Bell et al., CCS 2020) only on its legacy API: the server runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy ``flwr.server.strategy``
and a ``LegacyContext``; each client runs ``secaggplus_mod`` in front of a NumPyClient. fedvision
therefore has a second, thin app pair (``secagg_serverapp`` / ``secagg_clientapp``) over the same
engine, run directory and server helpers (central evaluation, metrics, checkpoints), picked by the
``secagg`` config group. What it cannot do is refused by :func:`check_secagg` before any work.

Weighting: each client uploads ``[r_i, r_i * u_i]`` quantised and masked, where ``u_i`` is its
update and ``r_i = round(n_i / max_weight * Q) / Q`` its example count over ``max_weight``; the
workflow unmasks the two sums and divides, so the example-weighted mean is folded into the secure
sum. fedvision sets ``max_weight`` to the largest client's training-set size, so ``r_i <= 1``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from tqdm import tqdm

from fedvision import constants as C
from fedvision.data.partition import load_partition
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import float32_arrays, layout_of, unpack
from fedvision.fl.checkpoint import Checkpoint, link_or_copy, rng_state, save_checkpoint
from fedvision.fl.evaluation import CentralEvaluator, selection_key
from fedvision.fl.parts import base_fingerprint, local_bn, merge, run_parts, subset, travelling
from fedvision.fl.privacy import client_level_mode, num_sampled_clients
from fedvision.fl.round_config import lr_horizon, train_config
from fedvision.report.metrics import RunRecorder
from fedvision.report.tracking import build_tracker
from fedvision.rundir import RunPlan, read_plan
from strategies.update_fedavg import FedAvgOfUpdates

DEFAULT_APPS = ("fedvision.fl.serverapp:app", "fedvision.fl.clientapp:app")
SECAGG_APPS = ("fedvision.fl.secagg_serverapp:app", "fedvision.fl.secagg_clientapp:app")
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
            f"secagg=secaggplus runs on runtime=simulation only, not runtime={runtime} (the "
            "deployment path runs fedvision's Message-API apps)",
        ),
        (
            cfg.get("resume") is not None,
            "secagg=secaggplus cannot resume: Flower's legacy loop starts at round 1; "
            "start a new run",
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


class SecAggRounds:
    """fedvision's bookkeeping around Flower's legacy loop: one record per round.

    ``DefaultWorkflow`` calls the strategy's ``evaluate_fn`` at round 0 and after every round's fit
    (whether or not it aggregated), and ``fit_metrics_aggregation_fn`` when a round aggregated.
    Here they evaluate centrally (``CentralEvaluator``), append to ``metrics.jsonl``
    (``RunRecorder``) and write checkpoints, as the Message-API server does.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, plan: RunPlan) -> None:
        self.cfg, self.run_dir, self.plan = cfg, run_dir, plan
        self.num_rounds = int(cfg["num_rounds"])
        self.evaluator = CentralEvaluator(cfg, plan)
        self.select_on = selection_key(cfg, plan)
        self.recorder = RunRecorder(
            run_dir, (), select_on=self.select_on, tracker=build_tracker(cfg, run_dir)
        )
        self.parts = run_parts(cfg, plan.num_classes)
        initial = torch.load(run_dir / C.RUN_INITIAL, map_location="cpu", weights_only=True)
        self.arrays = float32_arrays(initial)
        # SecAgg+ sums every array it is given, weighted by example count: parameters and
        # BatchNorm statistics travel as two masked arrays (FedAvg is the only rule here).
        self.layouts = [
            layout_of(subset(self.arrays, keys))
            for keys in (self.parts.shared, self.parts.stats)
            if keys
        ]
        self.base_fp = base_fingerprint(self.arrays, self.parts)
        partition = load_partition(Path(plan.partition_file))
        # The weight of the largest client maps to ratio 1: every r_i <= 1, none overflows.
        self.max_weight = max(1, max(len(t) for t in partition.train))
        self.fit: dict[str, Any] | None = None
        self.t0 = time.perf_counter()
        self.bar = tqdm(
            total=self.num_rounds, desc="rounds (secagg)", unit="round",
            disable=not cfg.get("progress", True), dynamic_ncols=True,
        )  # fmt: skip

    def initial_parameters(self) -> NDArrays:
        """The packed parameters (and BatchNorm statistics) of the round-0 model: what travels."""
        return travelling(self.arrays, self.parts)

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """The round's train config (as the Message-API server sends) plus SecAgg+'s scale."""
        return {
            **train_config(self.cfg, server_round, self.plan.num_classes),
            C.KEY_SERVER_ROUND: server_round,
            C.KEY_BASE_FINGERPRINT: self.base_fp,
            C.KEY_SECAGG_MAX_WEIGHT: float(self.max_weight),
            C.KEY_SECAGG_CLIP: float(self.cfg["secagg"]["clipping_range"]),
        }

    def fit_metrics(self, results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        """Example-weighted train loss/accuracy of the round's clients (their metrics are plain)."""
        total = sum(n for n, _ in results) or 1
        self.fit = {
            "train_loss": sum(n * float(m[C.KEY_TRAIN_LOSS]) for n, m in results) / total,
            "train_accuracy": sum(n * float(m[C.KEY_TRAIN_ACC]) for n, m in results) / total,
            "num_clients": len(results),
            "clients": sorted(int(m[C.KEY_PARTITION_ID]) for _, m in results),
            "secagg_clipped": sum(int(m.get(C.KEY_SECAGG_CLIPPED, 0)) for _, m in results),
        }
        return {"train_loss": self.fit["train_loss"], "train_accuracy": self.fit["train_accuracy"]}

    def evaluate(
        self, server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Record round ``server_round`` of the global model ``parameters`` (what travels)."""
        for flat, layout in zip(parameters, self.layouts, strict=True):
            packed = ArrayRecord({C.KEY_FLAT: Array(np.asarray(flat, dtype=np.float32))})
            self.arrays = merge(self.arrays, unpack(packed, layout))
        fit, self.fit = self.fit, None
        record: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            record.update(
                {
                    "train_loss": None, "train_accuracy": None, "num_clients": 0, "clients": [],
                    **(fit or {"aggregated": False}),
                    "lr": train_config(self.cfg, server_round, self.plan.num_classes)[C.KEY_LR],
                }
            )  # fmt: skip
        else:
            record["train_loss"] = None
        evaluated = (
            server_round == 0
            or server_round % int(self.cfg["eval_every"]) == 0
            or server_round == self.num_rounds
        )
        if evaluated:
            record.update(self.evaluator(self.arrays))
        best_round, best_value = self.recorder.best_with(record)
        latest = self.run_dir / C.CKPT_LATEST
        if server_round > 0:
            save_checkpoint(latest, self._checkpoint(server_round, best_round, best_value))
            record["round_s"] = round(time.perf_counter() - self.t0, 3)
        self.recorder.append(record)
        if best_round == server_round:
            if server_round == 0:
                save_checkpoint(
                    self.run_dir / C.CKPT_BEST, self._checkpoint(0, best_round, best_value)
                )
            else:
                link_or_copy(latest, self.run_dir / C.CKPT_BEST)
        if server_round > 0:
            self.bar.update(1)
        self.t0 = time.perf_counter()
        if not evaluated:
            return None
        return float(record["test_loss"]), {"test_accuracy": float(record["test_accuracy"])}

    def _checkpoint(self, rnd: int, best_round: int | None, best_value: float | None) -> Checkpoint:
        return Checkpoint(
            model=self.arrays.to_torch_state_dict(),
            arch=str(self.cfg["model"]["name"]),
            num_classes=self.plan.num_classes,
            round=rnd,
            lr_horizon=lr_horizon(self.cfg),
            strategy={},  # FedAvg keeps no state; a SecAgg+ run cannot resume anyway
            rng=rng_state(),
            best_round=best_round,
            best_value=best_value,
        )


def serve_secagg(
    grid: Grid, run_dir: Path, cfg: dict[str, Any], started: float, context: Context | None = None
) -> dict[str, Any]:
    """The SecAgg+ run's rounds on ``grid`` (``fedvision.fl.server.serve`` writes the status)."""
    check_secagg(cfg)
    settings = secagg_settings(cfg)
    assert settings is not None  # check_secagg passed and the app was chosen by this group
    plan = read_plan(run_dir)
    rounds = SecAggRounds(cfg, run_dir, plan)
    scfg, n = cfg["strategy"], int(cfg["num_clients"])
    strategy = FedAvgOfUpdates(
        seed=int(cfg["seed"]),  # round r trains the same partitions in every run
        query_timeout_s=plan.connect_timeout_s,
        fraction_fit=float(scfg.get("fraction_train", 1.0)),
        fraction_evaluate=0.0,
        min_fit_clients=max(2, int(scfg.get("min_train_nodes", 2))),
        min_evaluate_clients=0,
        # Every client is up before round 1, as in the Message-API server.
        min_available_clients=max(n, int(scfg.get("min_available_nodes", 2))),
        evaluate_fn=rounds.evaluate,
        on_fit_config_fn=rounds.fit_config,
        fit_metrics_aggregation_fn=rounds.fit_metrics,
        initial_parameters=ndarrays_to_parameters(rounds.initial_parameters()),
    )
    if context is None:
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=int(cfg["num_rounds"])), strategy=strategy
    )
    timeout = settings["timeout"]
    if timeout is None:
        timeout = plan.round_timeout_s
    workflow = build_workflow(settings, rounds.max_weight, float(timeout))
    t_start = time.perf_counter()
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    rounds.bar.close()
    done = sum(1 for r in rounds.recorder.records if r["round"] > 0 and "aggregated" not in r)
    if done < int(cfg["num_rounds"]):
        print(
            f"fedvision: secagg: {int(cfg['num_rounds']) - done} round(s) did not aggregate "
            "(SecAgg+ halted: too few clients or shares); the global model stayed",
            file=sys.stderr,
        )
    return rounds.recorder.finish(
        num_rounds=int(cfg["num_rounds"]),
        wall_s=time.perf_counter() - t_start,
        extra={
            "timings": {"server_start": started},
            "secagg": {**settings, "max_weight": rounds.max_weight},
        },
    )
