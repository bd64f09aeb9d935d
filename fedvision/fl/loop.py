"""The round loop: resume, configure, exchange, aggregate, evaluate, record, checkpoint.

This is the loop of ``flwr.serverapp.strategy.Strategy.start`` with what a research run needs
on top: a start round (resume), checkpoints with the strategy's state, model selection on
validation data, metrics per round and a progress line. Sampling, configuring and aggregating
are the strategy's (``strategies.sampling.SeededSampling`` around a Flower strategy); no
training happens here, the global model is only evaluated.

The server keeps the whole global model but hands the strategy only the parameters that train
(minus FedBN's local BatchNorm: ``fedvision.fl.parts``), then merges the aggregate back, so any
strategy aggregates exactly the parameters. BatchNorm running statistics travel beside them and
are averaged here by example count; counters never travel.

A feature that changes a round (differential privacy, simulated devices, FedBN) is a
:class:`Feature`: the loop calls its hooks at fixed points and knows nothing else of it. A new
feature implements the hooks it needs and adds one line to :func:`features`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from fedvision import constants as C
from fedvision.atomic import fsync_dir
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import float32_arrays, layout_of, message_bytes, pack
from fedvision.fl.checkpoint import (
    Checkpoint,
    link_or_copy,
    load_checkpoint,
    restore_rng_state,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from fedvision.fl.client_state import ClientStates
from fedvision.fl.cohort import CohortRounds
from fedvision.fl.directory import (
    ClientDirectory,
    InterruptibleGrid,
    exchange,
    failures_of,
    first_error,
    in_partition_order,
    node_log,
    say_failures,
)
from fedvision.fl.evaluation import CentralEvaluator, federated_evaluate, selection_key
from fedvision.fl.feature import Feature, Trained
from fedvision.fl.parts import (
    FedBNRound,
    apply_aggregate,
    base_fingerprint,
    packed_stats,
    run_parts,
    subset,
    take_stats,
    with_stats,
)
from fedvision.fl.round_config import lr_horizon, train_config
from fedvision.fl.secagg import SecureRounds
from fedvision.fl.strategy import build_strategy
from fedvision.models import ModelParts
from fedvision.privacy.plan import server_clipping_norm
from fedvision.privacy.server import PrivacyRound, update_norm_record
from fedvision.report.metrics import RunRecorder, read_metrics
from fedvision.report.tracking import build_tracker
from fedvision.rundir import read_node_events, read_plan
from fedvision.system.round import SystemRound
from strategies.sampling import base_strategy

Layout = dict[str, tuple[int, ...]]  # how a packed record is cut back into named arrays


def features(
    cfg: Mapping[str, Any],
    run_dir: Path,
    history: Sequence[Mapping[str, Any]],
    resumed: Checkpoint | None,
    *,
    states_kept: bool = False,
) -> list[Feature]:
    """The run's features, built once from its config (``resumed``: the checkpoint, or None;
    ``states_kept``: the clients' state between rounds survives a resume)."""
    built = (
        PrivacyRound.build(cfg, history, resumed),
        SystemRound.build(cfg, run_dir, history),
        FedBNRound.build(cfg, resumed, states_kept=states_kept),
    )
    return [f for f in built if f is not None]


def _resume(
    run_dir: Path, strategy: Strategy, arch: str, num_classes: int, horizon: int
) -> tuple[Checkpoint | None, ArrayRecord, int, list[dict[str, Any]]]:
    """Where the run starts: its latest checkpoint (strategy and RNG restored), else round 0.

    Returns the checkpoint (None for a new run), the global model, its round and the metric
    records up to that round.
    """
    latest = run_dir / C.CKPT_LATEST
    if not latest.exists():
        initial = torch.load(run_dir / C.RUN_INITIAL, map_location="cpu", weights_only=True)
        return None, float32_arrays(initial), 0, []
    resumed = load_checkpoint(latest, arch=arch, num_classes=num_classes)
    if resumed.lr_horizon != horizon:
        raise FedvisionError(
            f"{latest} ran a learning-rate schedule over {resumed.lr_horizon} rounds, the "
            f"config says {horizon}; a resumed run keeps its schedule"
        )
    restore_strategy_state(strategy, resumed.strategy)
    restore_rng_state(resumed.rng)
    history = [r for r in read_metrics(run_dir) if int(r["round"]) <= resumed.round]
    return resumed, resumed.arrays(), resumed.round, history


class MessageRounds:
    """A round on the Message API: the strategy configures, the clients train, it aggregates.

    The features' exchange hooks (``plan`` ... ``record``) are called here. SecAgg+ rounds
    (:class:`fedvision.fl.secagg.SecureRounds`) and cohort rounds
    (:class:`fedvision.fl.cohort.CohortRounds`) take this object's place.
    """

    def __init__(
        self, cfg: Mapping[str, Any], strategy: Strategy, hooks: Sequence[Feature],
        parts: ModelParts, layouts: tuple[Layout, Layout], timeout: float,
    ) -> None:  # fmt: skip
        self.strategy, self.hooks, self.parts, self.timeout = strategy, hooks, parts, timeout
        self.layouts = layouts
        self.min_replies = int(cfg.get("min_train_replies", 1))
        self.clip_norm = server_clipping_norm(cfg)

    def train(
        self,
        grid: Grid,
        rnd: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        partition_of: Mapping[int, int],
    ) -> Trained:
        """Round ``rnd`` from the global model ``arrays``."""
        strategy, hooks, parts = self.strategy, self.hooks, self.parts
        strategy.set_partitions(partition_of)
        shared = pack(subset(arrays, parts.shared))
        stats = packed_stats(arrays, parts)
        messages = with_stats(strategy.configure_train(rnd, shared, config, grid), stats)
        pids = sorted(partition_of[m.metadata.dst_node_id] for m in messages)
        for h in hooks:
            messages = h.plan(rnd, messages, partition_of)
        bytes_down = message_bytes(messages)
        replies = in_partition_order(
            exchange(grid, messages, self.timeout) if messages else [], partition_of
        )
        ok = [m for m in replies if not m.has_error()]
        for h in hooks:
            h.replied(ok, partition_of)
        failures = failures_of(messages, replies, partition_of)
        if not ok and messages:
            raise FedvisionError(f"round {rnd}: every client failed; first: {first_error(replies)}")
        settled: dict[str, Any] = {}  # what the features say of the replies that count
        for h in hooks:
            ok, metrics = h.settle(ok, partition_of)
            settled.update(metrics)
        replies = [m for m in replies if m.has_error() or any(m is a for a in ok)]
        aggregate = len(ok) >= self.min_replies
        if failures:  # recorded in metrics.jsonl too; said here so that nobody misses it
            say_failures(rnd, failures, len(messages), len(ok), self.min_replies)

        # Aggregate. Bytes are counted first: some strategies empty the replies they aggregate.
        bytes_up = message_bytes(ok)
        client_stats = take_stats(ok)  # the strategy gets parameters only
        norms = update_norm_record(ok, shared, self.clip_norm)
        aggregate = aggregate and all([h.release(rnd, ok, strategy) for h in hooks])
        train_metrics, new_arrays = None, None
        if aggregate:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            arrays = apply_aggregate(arrays, new_arrays, client_stats, self.layouts)
        for h in hooks:
            h.after_aggregate(new_arrays is not None)
        record = {
            "num_clients": len(ok),
            "num_failures": len(failures),
            "clients": pids,
            "bytes_down": int(bytes_down),
            "bytes_up": int(bytes_up),
            **settled,
            **norms,
        }
        for h in hooks:
            record.update(h.record(rnd, ok))
        if failures:
            record["failures"] = failures
        if not aggregate:
            record["aggregated"] = False
        return Trained(arrays, train_metrics, record)


def run_rounds(grid: Grid, run_dir: Path, cfg: dict[str, Any], started: float) -> dict[str, Any]:
    """Run a prepared run directory's remaining rounds on ``grid``; its ``summary.json`` content."""
    timings = {"server_start": started}
    plan = read_plan(run_dir)
    num_rounds, num_classes = int(cfg["num_rounds"]), plan.num_classes
    arch, horizon = str(cfg["model"]["name"]), lr_horizon(cfg)
    timeout = float(plan.round_timeout_s)
    strategy = build_strategy(cfg, wait_timeout_s=plan.connect_timeout_s)
    evaluator = CentralEvaluator(cfg, plan)
    select_on = selection_key(cfg, plan)

    latest = run_dir / C.CKPT_LATEST
    resumed, arrays, start, history = _resume(run_dir, strategy, arch, num_classes, horizon)
    recorder = RunRecorder(
        run_dir, history, select_on=select_on, tracker=build_tracker(cfg, run_dir)
    )
    # Clients that see the run directory keep their state there, in step with the checkpoints.
    states = ClientStates(Path(plan.client_state_dir)) if plan.client_state_dir else None
    if states is not None:
        states.start(None if resumed is None else resumed.round)
    hooks = features(cfg, run_dir, history, resumed, states_kept=states is not None)
    # The strategy sees only what training changes (and FedBN keeps BatchNorm on the clients);
    # the rest of `arrays` never changes, and its fingerprint tells clients which base to use.
    parts = run_parts(cfg, num_classes)
    base_fp = base_fingerprint(arrays, parts)
    layouts = (layout_of(subset(arrays, parts.shared)), layout_of(subset(arrays, parts.stats)))
    secure = SecureRounds.build(cfg, plan)  # SecAgg+: its workflow exchanges and aggregates
    # Cohort execution: a few workers train the sampled clients back to back (fl/cohort.py).
    cohorts = CohortRounds.build(cfg, plan, strategy, parts, layouts, timeout, hooks)
    rounds = secure or cohorts or MessageRounds(cfg, strategy, hooks, parts, layouts, timeout)
    hooks += [secure] if secure else []
    federated = float(getattr(base_strategy(strategy), "fraction_evaluate", 0.0)) > 0

    def checkpoint(
        rnd: int, arrays: ArrayRecord, best_round: int | None, best_value: float | None
    ) -> Checkpoint:
        kept = {k: v for h in hooks for k, v in h.checkpoint().items()}
        return Checkpoint(
            model=arrays.to_torch_state_dict(), arch=arch, num_classes=num_classes, round=rnd,
            lr_horizon=horizon, strategy=strategy_state(strategy), rng=rng_state(),
            best_round=best_round, best_value=best_value, **kept,
        )  # fmt: skip

    if start == 0:
        recorder.append({"round": 0, **evaluator(arrays), "train_loss": None})
        if recorder.best_with()[0] == 0:  # the starting model is a candidate too
            save_checkpoint(run_dir / C.CKPT_BEST, checkpoint(0, arrays, *recorder.best_with()))
    timings["round0_done"] = time.time()

    # After the round-0 evaluation: it runs while the clients' processes start.
    held = read_node_events(run_dir)
    directory = ClientDirectory(
        int(plan.cohort_workers or cfg["num_clients"]),  # cohort workers hold no partition
        on_event=node_log(run_dir),
        held_before=[(e["node"], e["partition"]) for e in held if e["event"] == "holds"],
    )
    directory.wait_for_all(grid, float(plan.connect_timeout_s))
    timings["clients_ready"] = time.time()

    bar = tqdm(
        total=num_rounds, initial=start, desc="rounds", unit="round",
        disable=not cfg.get("progress", True), dynamic_ncols=True,
    )  # fmt: skip
    t_start = time.perf_counter()
    stopped: str | None = None
    for rnd in range(start + 1, num_rounds + 1):
        if stopped := next((s for h in hooks if (s := h.stop(rnd))), None):
            tqdm.write(
                f"fedvision: {stopped}; the run stops after round {rnd - 1}", file=sys.stderr
            )
            break
        t0 = time.perf_counter()
        if rnd == start + 1:
            timings["first_round_start"] = time.time()
        config = ConfigRecord(
            {**train_config(cfg, rnd, num_classes), C.KEY_BASE_FINGERPRINT: base_fp}
        )
        if states is not None:
            config[C.KEY_CLIENT_STATE] = str(states.folder)
        for h in hooks:
            config.update(h.round_config(rnd))
        # Clients that restarted or reconnected come back under new node ids.
        joined = directory.refresh(grid)
        trained = rounds.train(grid, rnd, arrays, config, dict(directory.partition_of))
        arrays, train_metrics = trained.arrays, trained.metrics

        # Record and evaluate.
        record = {
            "round": rnd,
            "train_loss": train_metrics.get(C.KEY_TRAIN_LOSS) if train_metrics else None,
            "train_accuracy": train_metrics.get(C.KEY_TRAIN_ACC) if train_metrics else None,
            "lr": config[C.KEY_LR],
            **trained.record,
        }
        if joined and rnd > start + 1:
            record["clients_joined"] = joined  # came (back) during the run
        if federated:  # packing the model is three copies of it: only for clients that evaluate
            shared, stats = pack(subset(arrays, parts.shared)), packed_stats(arrays, parts)
            record.update(federated_evaluate(grid, strategy, shared, stats, config, rnd, timeout))
        if rnd % int(cfg["eval_every"]) == 0 or rnd == num_rounds:
            record.update(evaluator(arrays))

        # Checkpoint: written inside the timed round, put in place after the metrics line, so a
        # crash in between leaves the previous checkpoint and resume redoes this round.
        best_round, best_value = recorder.best_with(record)
        tmp = latest.with_name(latest.name + ".next")
        if isinstance(grid, InterruptibleGrid):
            grid.check()  # a server that lost its run to a restarted one writes nothing more
        save_checkpoint(tmp, checkpoint(rnd, arrays, best_round, best_value))
        record["round_s"] = round(time.perf_counter() - t0, 3)
        recorder.append(record)
        os.replace(tmp, latest)
        fsync_dir(run_dir)  # the rename itself survives a power cut
        if states is not None:  # only now: until the rename, a resume starts from round rnd - 1
            states.keep_newest(trained.record.get("clients", []))
        if best_round == rnd:
            link_or_copy(latest, run_dir / C.CKPT_BEST)
        bar.set_postfix(
            val=_fmt(record.get(select_on or "")), test=_fmt(record.get("test_accuracy")),
            refresh=False,
        )  # fmt: skip
        bar.update(1)
    bar.close()
    extra: dict[str, Any] = {"timings": timings}
    for h in hooks:
        extra.update(h.summary(recorder.records))
    if stopped:
        extra["stopped"] = stopped
    return recorder.finish(num_rounds=num_rounds, wall_s=time.perf_counter() - t_start, extra=extra)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
