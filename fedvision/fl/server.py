"""The server side of a run: discover clients, let the strategy sample and aggregate, evaluate.

This is the round loop of ``flwr.serverapp.strategy.Strategy.start`` with what a research run
needs on top: a start round (resume), checkpoints with the strategy's state, model selection on
validation data, metrics per round and a progress line. Sampling, configuring and aggregating
are the strategy's (``strategies.sampling.SeededSampling`` around a Flower strategy); no
training happens here, the global model is only evaluated.

The server keeps the whole global model but hands the strategy only the parameters that train
(minus FedBN's local BatchNorm: ``fedvision.fl.parts``), then merges the aggregate back, so any
strategy aggregates exactly the parameters. BatchNorm running statistics travel beside them and
are averaged here by example count; counters never travel.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from tqdm import tqdm

from fedvision import constants as C
from fedvision.config import model_normalise
from fedvision.data.cache import DecodedCache
from fedvision.engine import evaluate, resolve_device
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import float32_arrays, layout_of, pack, unpack
from fedvision.fl.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_rng_state,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from fedvision.fl.parts import (
    base_fingerprint,
    local_bn,
    mean_stats,
    merge,
    packed_stats,
    run_parts,
    subset,
    take_stats,
    with_stats,
)
from fedvision.fl.privacy import (
    accountant,
    check_equal_weights,
    num_sampled_clients,
    privacy_record,
    privacy_round_config,
    privacy_summary,
    release_noise_multiplier,
    server_clipping_norm,
    update_norm_record,
    wrap_strategy,
)
from fedvision.fl.round_config import lr_horizon, train_config
from fedvision.fl.system_round import SystemRound
from fedvision.models import build_model
from fedvision.report.metrics import RunRecorder, read_metrics
from fedvision.report.tracking import build_tracker
from fedvision.rundir import (
    RunInterrupted,
    RunPlan,
    RunSuperseded,
    append_node_event,
    claim_server,
    describe_node_event,
    interrupt_requested,
    load_run_config,
    read_node_events,
    read_plan,
    superseded,
    write_status,
)
from strategies.sampling import SeededSampling, base_strategy, sample_size


def build_strategy(cfg: Mapping[str, Any]) -> SeededSampling:
    """The Flower strategy of ``cfg.strategy`` (by ``_target_``), inside seeded sampling.

    Every key of the strategy config goes to the Flower strategy, which alone owns how many
    clients a round uses; ``SeededSampling`` only decides which. Client-level DP
    (``privacy.wrapper``) wraps the strategy inside the sampling: ``SeededSampling(DP(FedAvg))``.
    """
    scfg = cfg["strategy"]
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    # Flower's strategies log warnings for settings fedvision uses on purpose (fraction_evaluate=0).
    flwr_logger.setLevel(logging.ERROR)
    try:
        strategy = instantiate(dict(scfg))
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise FedvisionError(
            f"cannot build strategy {scfg.get('_target_')!r}: {exc}".splitlines()[0]
        ) from exc
    finally:
        flwr_logger.setLevel(level)
    if not isinstance(strategy, Strategy):
        raise FedvisionError(f"strategy._target_ {scfg.get('_target_')!r} is no Strategy")
    strategy = wrap_strategy(cfg, strategy)
    return SeededSampling(
        strategy,
        seed=int(cfg["seed"]),
        wait_timeout_s=float(cfg["runtime"].get("connect_timeout_s", 120)),
    )


def check_strategy(cfg: Mapping[str, Any]) -> None:
    """Refuse sampling settings that cannot work with ``num_clients`` clients (before any work)."""
    n = int(cfg["num_clients"])
    base = base_strategy(build_strategy(cfg))
    # Strategies that assume a local optimiser (SCAFFOLD, FedNova: SGD) say so before any work.
    if callable(check_client := getattr(base, "check_client_config", None)):
        check_client(cfg["client"])
    for key in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        if int(getattr(base, key, 0)) > n:
            raise FedvisionError(
                f"strategy.{key}={getattr(base, key)} but only num_clients={n} clients exist; "
                f"lower strategy.{key} or raise num_clients"
            )
    for kind in ("train", "evaluate"):
        fraction = float(getattr(base, f"fraction_{kind}", 0.0))
        if not 0.0 <= fraction <= 1.0:
            raise FedvisionError(f"strategy.fraction_{kind}={fraction} must lie in [0, 1]")
        minimum = int(getattr(base, f"min_{kind}_nodes", 0))
        if (fraction > 0 or kind == "train") and sample_size(n, fraction, minimum) == 0:
            raise FedvisionError(
                f"strategy.fraction_{kind}={fraction} with min_{kind}_nodes={minimum} samples 0 of "
                f"{n} clients, so no round could {kind}; raise one of them"
            )
    if float(getattr(base, "fraction_evaluate", 0.0)) > 0 and (
        float(cfg["partition"].get("val_fraction", 0)) <= 0
    ):
        raise FedvisionError(
            "strategy.fraction_evaluate > 0 needs local validation data: set partition.val_fraction"
        )


# How often the round loop asks the grid for replies. Flower's deployment grid sleeps 3 s between
# pulls in send_and_receive; a short poll costs a few tiny requests and saves seconds per round.
POLL_S = 0.05
# Error codes the SuperLink writes for a node it cannot reach (Flower's ErrorCode): the node's
# query is retried at the next refresh instead of failing the run.
UNREACHABLE = (3, 4, 5)  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE
# How long a node that just appeared gets to say which partition it holds.
QUERY_TIMEOUT_S = 15.0


def exchange(
    grid: Grid, messages: Iterable[Message], timeout_s: float, poll_s: float = POLL_S
) -> list[Message]:
    """Send ``messages``, collect the replies that come within ``timeout_s``.

    ``Grid.send_and_receive`` with a short poll (late replies are dropped, as there).
    """
    pending = set(grid.push_messages(list(messages)))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return replies


class ClientDirectory:
    """Which partition each connected node holds, kept current as nodes come and go.

    Node ids are assigned by the SuperLink; partition ids are what a node says it holds. A node
    is asked (a QUERY message) which partition it holds when it appears. A partition belongs
    to the first node that claimed it: while that node is connected, another node claiming
    the same partition is refused (it is sent nothing), so a node that joins late cannot
    replace an honest one. When the holder is gone, the next claimant in claim order holds
    the partition until an earlier one comes back. With node authentication (on with TLS) a
    node id is its registered key, stable across restarts; without it a restarted client
    comes back under a new id and takes its partition over once the SuperLink has dropped the
    old one. Nodes that do not answer (gone, but not yet marked offline) are asked again at
    the next refresh.
    Every change of holder and every refusal goes to ``on_event`` (the run's ``nodes.jsonl``);
    ``held_before`` (node, partition) from that file keeps the claim order across a resume.
    """

    def __init__(
        self,
        expected: int,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        held_before: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.expected = int(expected)
        self.on_event = on_event
        self.partition_of: dict[int, int] = {}  # node -> partition, the node that holds it now
        self.claims: dict[int, int] = {}  # node -> partition, in claim order
        for node, pid in held_before:
            self.claims.setdefault(int(node), int(pid))
        self._asked: set[int] = set()  # connected nodes that answered this server
        self._holder: dict[int, int] = {}  # partition -> node, as of the last refresh
        self._refused: dict[int, int] = {}  # node -> the holder it was last refused for

    def refresh(self, grid: Grid, timeout_s: float = QUERY_TIMEOUT_S) -> list[int]:
        """Ask new nodes which partition they hold; return the partitions that changed holder."""
        nodes = set(grid.get_node_ids())
        self._asked &= nodes  # a node that was away is asked again: it may have restarted
        new = sorted(nodes - self._asked)
        queries = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in new
        ]
        replies = exchange(grid, queries, timeout_s) if new else []
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            if reply.has_error() and int(reply.error.code) in UNREACHABLE:
                # The SuperLink answers for a node it lost (a restart, a lapsed heartbeat): not
                # the client's fault; it is asked again at the next refresh if it comes back.
                continue
            if reply.has_error():
                raise FedvisionError(
                    f"client on node {reply.metadata.src_node_id} failed to start: "
                    f"{reply.error.reason.strip().splitlines()[-1]}"
                )
            pid = int(reply.content[C.KEY_METRICS][C.KEY_PARTITION_ID])
            if not 0 <= pid < self.expected:
                raise FedvisionError(
                    f"a client reports partition {pid}, but the run has num_clients="
                    f"{self.expected} (ids 0..{self.expected - 1}): fix its --partition-id"
                )
            node = reply.metadata.src_node_id
            self._asked.add(node)
            if self.claims.get(node) != pid:  # a new claim (or another partition): last in line
                self.claims.pop(node, None)
                self.claims[node] = pid
        # Claim order decides; only nodes connected and heard from by this server count.
        present = nodes & self._asked
        holder: dict[int, int] = {}
        for node, pid in self.claims.items():
            if node in present:
                holder.setdefault(pid, node)
        changed = []
        for pid, node in sorted(holder.items()):
            before = self._holder.get(pid)
            if before != node:
                changed.append(pid)
                self._refused.pop(node, None)  # refused again later is news again
                gone = None if before is None else before not in present
                self._event("holds", node, pid, before=before, before_gone=gone)
        for node, pid in self.claims.items():
            if node in present and holder[pid] != node and self._refused.get(node) != holder[pid]:
                self._refused[node] = holder[pid]
                self._event("refused", node, pid, held_by=holder[pid])
        self._holder = holder
        self.partition_of = {n: p for p, n in holder.items()}
        return changed

    def _event(self, event: str, node: int, pid: int, **extra: int | bool | None) -> None:
        if self.on_event is not None:
            self.on_event(
                {"event": event, "node": node, "partition": pid, "time": round(time.time(), 3)}
                | {k: v for k, v in extra.items() if v is not None}
            )

    def wait_for_all(self, grid: Grid, timeout_s: float) -> dict[int, int]:
        """Wait until every partition 0..expected-1 is held by a connected node."""
        deadline = time.monotonic() + timeout_s
        while len(set(self.partition_of.values())) < self.expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                have = sorted(set(self.partition_of.values()))
                raise FedvisionError(
                    f"only {len(have)} of {self.expected} clients connected within "
                    f"{timeout_s:g} s (runtime.connect_timeout_s); partitions present: {have}"
                )
            self.refresh(grid, min(QUERY_TIMEOUT_S, max(remaining, 1.0)))
            if len(set(self.partition_of.values())) < self.expected:
                time.sleep(0.1)
        return dict(self.partition_of)


def node_log(run_dir: Path) -> Callable[[dict[str, Any]], None]:
    """Record the directory's events in ``nodes.jsonl``; print refusals and hand-overs."""

    def log(event: dict[str, Any]) -> None:
        append_node_event(run_dir, event)
        if (line := describe_node_event(event)) is not None:
            tqdm.write(line, file=sys.stderr)

    return log


class CentralEvaluator:
    """Evaluates the global model on the server's validation part and on the test split."""

    def __init__(self, cfg: Mapping[str, Any], plan: RunPlan) -> None:
        self.device = resolve_device(str(cfg["device"]))
        self.batch_size = int(cfg["eval_batch_size"])
        self.normalise = model_normalise(cfg)
        self.model = build_model(str(cfg["model"]["name"]), plan.num_classes).to(self.device)
        self.test = DecodedCache.open(plan.test_cache)
        self.train = DecodedCache.open(plan.train_cache)
        self.val_idx = None if plan.server_val_file is None else np.load(plan.server_val_file)

    def _eval(self, cache: DecodedCache, idx: np.ndarray | None) -> tuple[float, float]:
        res = evaluate(
            self.model, cache.images, cache.labels, idx, batch_size=self.batch_size,
            device=self.device, normalise=self.normalise,
        )  # fmt: skip
        return float(res.accuracy), float(res.loss)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Accuracy and loss on validation (when held) and test, as a metrics record."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        out: dict[str, float] = {}
        if self.val_idx is not None:
            out["val_accuracy"], out["val_loss"] = self._eval(self.train, self.val_idx)
        out["test_accuracy"], out["test_loss"] = self._eval(self.test, None)
        return out


def _replies_in_partition_order(
    replies: Iterable[Message], partition_of: Mapping[int, int]
) -> list[Message]:
    # Float sums depend on order: aggregating in partition order makes the result reproducible.
    return sorted(replies, key=lambda m: partition_of.get(m.metadata.src_node_id, 1 << 30))


def _failures(
    sent: Iterable[Message], replies: Iterable[Message], partition_of: Mapping[int, int]
) -> list[dict[str, Any]]:
    """Who failed this round and why: an error reply, or no reply within the round's timeout.

    Replies are matched to what was sent by message id: an error the SuperLink writes for an
    unreachable node does not come from that node.
    """
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out, answered = [], set()
    for m in replies:
        node = node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
        answered.add(node)
        if m.has_error():
            lines = (m.error.reason or "").strip().splitlines()
            out.append(
                {
                    "partition": partition_of.get(node),
                    "code": int(m.error.code),
                    "reason": lines[-1] if lines else f"error code {m.error.code}",
                }
            )
    for node in node_of.values():
        if node not in answered:
            out.append(
                {
                    "partition": partition_of.get(node),
                    "code": None,
                    "reason": "no reply within runtime.round_timeout_s",
                }
            )
    return sorted(out, key=lambda f: (f["partition"] is None, f["partition"] or 0))


def _first_error(replies: Iterable[Message]) -> str:
    for m in replies:
        if m.has_error():
            return m.error.reason.strip().splitlines()[-1]
    return "no reply within the timeout"


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where the file system allows, else a copy."""
    # The best checkpoint is the latest one of its round: a hard link costs no second write.
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def selection_key(cfg: Mapping[str, Any], plan: RunPlan) -> str | None:
    """Which validation metric picks the best round: the server's part, else the clients'.

    Under FedBN the clients' own models (shared weights + their BatchNorm) are the models in use;
    the global model's BatchNorm is the initial one, so only the clients' validation can select.
    """
    if local_bn(cfg):
        return "client_val_accuracy"
    if plan.server_val_file is not None:
        return "val_accuracy"
    if float(cfg["strategy"].get("fraction_evaluate", 0.0)) > 0:
        return "client_val_accuracy"
    return None


RoundLoop = Callable[[Grid, Path, dict[str, Any], float], dict[str, Any]]


class InterruptibleGrid:
    """A Grid that raises :class:`RunInterrupted` once the launcher asked the run to stop.

    Every wait of the round loop polls the grid (replies every ``POLL_S``, nodes while they
    connect), so a signal stops a round within a poll, whatever the round's length; the last
    complete round's checkpoint stays in place.
    """

    def __init__(self, grid: Grid, run_dir: Path) -> None:
        self._grid, self._run_dir = grid, run_dir
        self._token = claim_server(run_dir)

    def _check(self) -> None:
        if superseded(self._run_dir, self._token):
            raise RunSuperseded(f"{self._run_dir}: another server took this run over")
        if interrupt_requested(self._run_dir):
            raise RunInterrupted(f"{self._run_dir}: stopped by a signal")

    def check(self) -> None:
        """Raise unless this server may still write the run (before each write of a round)."""
        self._check()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Grid.push_messages, unless the run was asked to stop."""
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Grid.pull_messages, unless the run was asked to stop."""
        self._check()
        return self._grid.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        """Grid.get_node_ids, unless the run was asked to stop."""
        self._check()
        return self._grid.get_node_ids()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def serve(grid: Grid, run_dir: Path, loop: RoundLoop | None = None) -> dict[str, Any]:
    """Run a prepared run directory's rounds on ``grid``; write its results there.

    Writes ``status.json`` (finished, failed with the one-line reason, or interrupted: the
    launcher got a signal and wrote ``C.RUN_INTERRUPT``) whatever happens.
    ``loop`` (grid, run directory, config, start time) -> summary runs the rounds; the default
    is this module's loop, the SecAgg+ app passes its own (``fedvision.fl.secagg``).
    """
    started = time.time()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    try:
        cfg = load_run_config(run_dir)
        if not cfg.get("verbose", False):
            # Flower's per-round INFO lines would break the progress line; warnings still show.
            flwr_logger.setLevel(logging.WARNING)
        if loop is None:  # SecAgg+'s legacy workflow drives its own grid
            grid = InterruptibleGrid(grid, run_dir)
        summary = (loop or _serve)(grid, run_dir, cfg, started)
    except RunSuperseded:  # the newer server owns status.json and everything else now
        return {}
    except RunInterrupted:
        done = max((int(r["round"]) for r in read_metrics(run_dir)), default=0)
        write_status(run_dir, "interrupted", f"stopped by a signal after round {done}", round=done)
        return {}
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        write_status(
            run_dir, "failed", reason, user_error=isinstance(exc, FedvisionError),
            type=type(exc).__name__,
        )  # fmt: skip
        raise
    finally:
        flwr_logger.setLevel(level)
    write_status(run_dir, "finished")
    return summary


def _serve(grid: Grid, run_dir: Path, cfg: dict[str, Any], started: float) -> dict[str, Any]:
    timings = {"server_start": started}
    plan = read_plan(run_dir)
    num_rounds, num_classes = int(cfg["num_rounds"]), plan.num_classes
    arch, horizon = str(cfg["model"]["name"]), lr_horizon(cfg)
    timeout = float(cfg["runtime"].get("round_timeout_s", 3600))
    strategy = build_strategy(cfg)
    evaluator = CentralEvaluator(cfg, plan)
    select_on = selection_key(cfg, plan)

    latest = run_dir / C.CKPT_LATEST
    if latest.exists():  # continue where the run stopped
        ckpt = load_checkpoint(latest, arch=arch, num_classes=num_classes)
        if ckpt.lr_horizon != horizon:
            raise FedvisionError(
                f"{latest} ran a learning-rate schedule over {ckpt.lr_horizon} rounds, the config "
                f"says {horizon}; a resumed run keeps its schedule"
            )
        restore_strategy_state(strategy, ckpt.strategy)
        restore_rng_state(ckpt.rng)
        arrays, start = ckpt.arrays(), ckpt.round
        history = [r for r in read_metrics(run_dir) if int(r["round"]) <= start]
        dpsgd_steps = dict(ckpt.dpsgd_steps)
    else:
        initial = torch.load(run_dir / C.RUN_INITIAL, map_location="cpu", weights_only=True)
        arrays, start, history, dpsgd_steps = float32_arrays(initial), 0, [], {}
    recorder = RunRecorder(
        run_dir, history, select_on=select_on, tracker=build_tracker(cfg, run_dir)
    )
    system = SystemRound.build(cfg, run_dir, history)  # None under system=none
    # Client-level DP: released rounds so far (a resumed run continues the account).
    dp_account = accountant(cfg, history)
    dp_sampled = num_sampled_clients(cfg)
    dpsgd = bool((cfg.get("privacy") or {}).get("dpsgd"))
    clip_norm = server_clipping_norm(cfg)
    stopped: str | None = None
    # The strategy sees only what training changes (and FedBN keeps BatchNorm on the clients);
    # the rest of `arrays` never changes, and its fingerprint tells clients which base to use.
    parts = run_parts(cfg, num_classes)
    base_fp = base_fingerprint(arrays, parts)
    layout = layout_of(subset(arrays, parts.shared))  # how the packed parameters are cut up
    stats_layout = layout_of(subset(arrays, parts.stats))  # and the packed BatchNorm statistics
    if start > 0 and parts.local:
        tqdm.write(
            "fedvision: FedBN resumes with every client's BatchNorm back at the initial weights "
            "(the clients' own BatchNorm is not in the checkpoint)",
            file=sys.stderr,
        )

    def checkpoint(
        rnd: int, arrays: ArrayRecord, best_round: int | None, best_value: float | None
    ) -> Checkpoint:
        return Checkpoint(
            model=arrays.to_torch_state_dict(),
            arch=arch,
            num_classes=num_classes,
            round=rnd,
            lr_horizon=horizon,
            strategy=strategy_state(strategy),
            rng=rng_state(),
            best_round=best_round,
            best_value=best_value,
            dpsgd_steps=dpsgd_steps,
        )

    if start == 0:
        recorder.append({"round": 0, **evaluator(arrays), "train_loss": None})
        if recorder.best_with()[0] == 0:  # the starting model is a candidate too
            save_checkpoint(run_dir / C.CKPT_BEST, checkpoint(0, arrays, *recorder.best_with()))
    timings["round0_done"] = time.time()

    # After the round-0 evaluation: it runs while the clients' processes start.
    held = read_node_events(run_dir)
    directory = ClientDirectory(
        int(cfg["num_clients"]),
        on_event=node_log(run_dir),
        held_before=[(e["node"], e["partition"]) for e in held if e["event"] == "holds"],
    )
    directory.wait_for_all(grid, float(cfg["runtime"].get("connect_timeout_s", 120)))
    timings["clients_ready"] = time.time()
    min_replies = int(cfg.get("min_train_replies", 1))

    bar = tqdm(
        total=num_rounds,
        initial=start,
        desc="rounds",
        unit="round",
        disable=not cfg.get("progress", True),
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    for rnd in range(start + 1, num_rounds + 1):
        if dp_account is not None and (stopped := dp_account.next_round_exceeds(rnd)):
            tqdm.write(
                f"fedvision: {stopped}; the run stops after round {rnd - 1}", file=sys.stderr
            )
            break
        t0 = time.perf_counter()
        if rnd == start + 1:
            timings["first_round_start"] = time.time()
        config = ConfigRecord(
            {
                **train_config(cfg, rnd, num_classes),
                **privacy_round_config(cfg),
                C.KEY_BASE_FINGERPRINT: base_fp,
            }
        )
        if dpsgd:  # each client's DP-SGD steps so far: its epsilon survives a resume
            n = int(cfg["num_clients"])
            config[C.KEY_DPSGD_PRIOR] = [int(dpsgd_steps.get(p, 0)) for p in range(n)]
        # Clients that restarted or reconnected come back under new node ids.
        joined = directory.refresh(grid)
        partition_of = dict(directory.partition_of)
        strategy.set_partitions(partition_of)
        shared = pack(subset(arrays, parts.shared))
        stats = packed_stats(arrays, parts)
        messages = with_stats(strategy.configure_train(rnd, shared, config, grid), stats)
        pids = sorted(partition_of[m.metadata.dst_node_id] for m in messages)
        if system is not None:  # simulated devices: dropouts are not sent, step caps per client
            messages = system.plan(rnd, messages, partition_of)
        bytes_down = sum(
            a.count_bytes() for m in messages for a in m.content.array_records.values()
        )
        replies = _replies_in_partition_order(
            exchange(grid, messages, timeout) if messages else [], partition_of
        )
        ok = [m for m in replies if not m.has_error()]
        for m in ok:  # each client's DP-SGD steps so far, late replies' included (they trained)
            if C.KEY_DPSGD_STEPS in m.content[C.KEY_METRICS]:
                pid = partition_of[m.metadata.src_node_id]
                dpsgd_steps[pid] = int(m.content[C.KEY_METRICS][C.KEY_DPSGD_STEPS])
        failures = _failures(messages, replies, partition_of)
        if not ok and messages:
            raise FedvisionError(
                f"round {rnd}: every client failed; first: {_first_error(replies)}"
            )
        sim_record: dict[str, Any] = {}
        if system is not None:  # late updates are left out; the simulated clock advances
            ok, sim_record = system.settle(ok, partition_of)
            replies = [m for m in replies if m.has_error() or any(m is a for a in ok)]
        aggregate = len(ok) >= min_replies
        if failures:
            # Recorded in metrics.jsonl too; said here so that nobody misses it.
            tqdm.write(
                f"fedvision: round {rnd}: {len(failures)} of {len(messages)} clients failed "
                f"({failures[0]['reason']}); "
                + (
                    f"aggregating the other {len(ok)}"
                    if aggregate
                    else f"{len(ok)} replies < min_train_replies={min_replies}: the global "
                    "model stays as it was"
                ),
                file=sys.stderr,
            )
        # Counted before aggregating: some strategies empty the replies they aggregate.
        bytes_up = sum(a.count_bytes() for m in ok for a in m.content.array_records.values())
        client_stats = take_stats(ok)  # the strategy gets parameters only
        norms = update_norm_record(ok, shared, clip_norm)
        train_metrics = None
        released_at: float | None = None  # the noise multiplier this round is released at
        withheld: str | None = None
        if aggregate and dp_account is not None:
            check_equal_weights(ok)
            # Flower's wrappers keep the noise of dp_sampled replies for fewer: account for it.
            released_at = release_noise_multiplier(strategy, dp_sampled, len(ok))
            if withheld := dp_account.exceeds(rnd, released_at):
                aggregate, released_at = False, None
                tqdm.write(f"fedvision: {withheld}; round {rnd} is not released", file=sys.stderr)
        if aggregate:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = merge(arrays, unpack(float32_arrays(new_arrays), layout))
                if (mean := mean_stats(client_stats)) is not None:
                    arrays = merge(arrays, unpack(mean, stats_layout))
                if released_at is not None:
                    dp_account.step(released_at)
            else:
                released_at = None
        record: dict[str, Any] = {
            "round": rnd,
            "train_loss": train_metrics.get(C.KEY_TRAIN_LOSS) if train_metrics else None,
            "train_accuracy": train_metrics.get(C.KEY_TRAIN_ACC) if train_metrics else None,
            "num_clients": len(ok),
            "num_failures": len(failures),
            "clients": pids,
            "lr": config["lr"],
            "bytes_down": int(bytes_down),
            "bytes_up": int(bytes_up),
        }
        record.update(sim_record)
        record.update(norms)
        record.update(privacy_record(dp_account, ok, released_at))
        if withheld:
            record["dp_withheld"] = withheld
        if failures:
            record["failures"] = failures
        if not aggregate:
            record["aggregated"] = False
        if joined and rnd > start + 1:
            record["clients_joined"] = joined  # came (back) during the run
        if parts.local:
            # Clients whose BatchNorm started from the base this round: each client once in a
            # run, unless the runtime lost its state (a resume, a restarted SuperNode).
            record["clients_new_bn"] = sum(
                int(m.content[C.KEY_METRICS].get(C.KEY_NEW_BN, 0)) for m in ok
            )
        shared, stats = pack(subset(arrays, parts.shared)), packed_stats(arrays, parts)
        record.update(_federated_evaluate(grid, strategy, shared, stats, config, rnd, timeout))
        if rnd % int(cfg["eval_every"]) == 0 or rnd == num_rounds:
            record.update(evaluator(arrays))
        best_round, best_value = recorder.best_with(record)
        # The checkpoint is written inside the timed round, then put in place after the metrics
        # line: a crash in between leaves the previous checkpoint, and resume redoes this round.
        tmp = latest.with_name(latest.name + ".next")
        if isinstance(grid, InterruptibleGrid):
            grid.check()  # a server that lost its run to a restarted one writes nothing more
        save_checkpoint(tmp, checkpoint(rnd, arrays, best_round, best_value))
        record["round_s"] = round(time.perf_counter() - t0, 3)
        recorder.append(record)
        os.replace(tmp, latest)
        if best_round == rnd:
            link_or_copy(latest, run_dir / C.CKPT_BEST)
        bar.set_postfix(
            val=_fmt(record.get(select_on or "")), test=_fmt(record.get("test_accuracy")),
            refresh=False,
        )  # fmt: skip
        bar.update(1)
    bar.close()
    return recorder.finish(
        num_rounds=num_rounds,
        wall_s=time.perf_counter() - t_start,
        extra={
            "timings": timings,
            **({"local_bn": True} if parts.local else {}),
            **privacy_summary(cfg, dp_account, recorder.records, stopped),
        },
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _federated_evaluate(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    stats: ArrayRecord | None,
    config: ConfigRecord,
    rnd: int,
    timeout: float,
) -> dict[str, Any]:
    """Clients evaluate the global model on their local validation parts (when configured).

    Under FedBN each client evaluates its own model: the shared weights with its BatchNorm.
    """
    messages = with_stats(strategy.configure_evaluate(rnd, arrays, config, grid), stats)
    if not messages:
        return {}
    replies = [
        m
        for m in exchange(grid, messages, timeout)
        # A client whose validation part is empty has nothing to say (and a zero weight would
        # divide by zero if every sampled client were such a client).
        if m.has_error() or m.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES] > 0
    ]
    metrics = strategy.aggregate_evaluate(rnd, replies)
    if metrics is None:
        return {"client_val_accuracy": None, "client_val_loss": None}
    return {
        "client_val_accuracy": metrics.get(C.KEY_VAL_ACC),
        "client_val_loss": metrics.get(C.KEY_VAL_LOSS),
    }
