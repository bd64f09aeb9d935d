"""The server side of a run: sample clients, let the Flower strategy aggregate, evaluate, record.

This is the round loop of ``flwr.serverapp.strategy.Strategy.start`` with what a research run needs
on top: a start round (resume), reproducible client sampling, checkpoints, metrics per round and a
progress line. No training happens here; the global model is only evaluated.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from tqdm import tqdm

from fedvision import constants as C
from fedvision.data.cache import DecodedCache
from fedvision.engine import evaluate, resolve_device
from fedvision.errors import FedvisionError
from fedvision.fl.round_config import train_config
from fedvision.models import build_model
from fedvision.report.metrics import RunRecorder

# Keys of the strategy config that fedvision's sampler owns (not passed on to Flower).
SAMPLING_KEYS = (
    "fraction_train",
    "min_train_nodes",
    "min_available_nodes",
    "fraction_evaluate",
    "min_evaluate_nodes",
)


@dataclass
class ServerPlan:
    """Everything the ServerApp needs, prepared and validated before Flower starts."""

    cfg: dict[str, Any]
    run_dir: Path
    num_classes: int
    test_cache: Path
    initial_state: dict[str, torch.Tensor]
    start_round: int = 0
    history: list[dict] = field(default_factory=list)


def build_strategy(strategy_cfg: Mapping[str, Any]) -> Strategy:
    """Instantiate the Flower strategy named by ``_target_`` with sampling left to fedvision.

    fedvision hands the strategy only the nodes it sampled, so the strategy must take all of them.
    """
    kwargs = {k: v for k, v in strategy_cfg.items() if k not in SAMPLING_KEYS}
    try:
        strategy = instantiate(
            kwargs,
            fraction_train=1.0,
            min_train_nodes=1,
            min_available_nodes=1,
            fraction_evaluate=1.0,
            min_evaluate_nodes=1,
        )
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise FedvisionError(
            f"cannot build strategy {strategy_cfg.get('_target_')!r}: {exc}".splitlines()[0]
        ) from exc
    if not isinstance(strategy, Strategy):
        raise FedvisionError(f"strategy._target_ {strategy_cfg.get('_target_')!r} is no Strategy")
    return strategy


def sample_clients(
    partition_ids: Iterable[int], fraction: float, minimum: int, seed: int, server_round: int
) -> list[int]:
    """Pick this round's clients: ``max(int(fraction * n), minimum)`` of them, reproducibly.

    Flower's ``sample_nodes`` draws from random node ids with the global ``random`` module, so a
    rerun or a resumed run would train other clients; drawing partition ids from a generator
    seeded by (seed, round) makes round r's clients the same in every run.
    """
    ids = sorted(partition_ids)
    count = min(len(ids), max(int(fraction * len(ids)), minimum))
    if count <= 0:
        return []
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(ids, size=count, replace=False))


class _NodesView:
    """A Grid that shows a strategy only the nodes sampled for this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def discover_clients(grid: Grid, expected: int, timeout_s: float) -> dict[int, int]:
    """Wait for ``expected`` nodes, ask each for its partition id; return ``{partition: node}``."""
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FedvisionError(
                f"only {len(node_ids)} of {expected} clients connected within {timeout_s:g} s "
                "(runtime.connect_timeout_s)"
            )
        time.sleep(0.2)
    queries = [
        Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        if reply.has_error():
            raise FedvisionError(
                f"client on node {reply.metadata.src_node_id} failed to start: "
                f"{reply.error.reason.strip().splitlines()[-1]}"
            )
        metrics = reply.content[C.KEY_METRICS]
        mapping[int(metrics[C.KEY_PARTITION_ID])] = reply.metadata.src_node_id
    if sorted(mapping) != list(range(expected)):
        raise FedvisionError(
            f"clients report partitions {sorted(mapping)}, expected 0..{expected - 1} once each"
        )
    return mapping


def _save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, **meta}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint behind


def _replies_in_partition_order(
    replies: Iterable[Message], partition_of: Mapping[int, int]
) -> list[Message]:
    # Float sums depend on order: aggregating in partition order makes the result reproducible.
    return sorted(replies, key=lambda m: partition_of.get(m.metadata.src_node_id, 1 << 30))


def _first_error(replies: Iterable[Message]) -> str:
    for m in replies:
        if m.has_error():
            return m.error.reason.strip().splitlines()[-1]
    return "no reply within the timeout"


def run_federation(grid: Grid, strategy: Strategy, plan: ServerPlan) -> dict[str, Any]:
    """Run rounds ``start_round+1 .. num_rounds``; return the run summary."""
    cfg = plan.cfg
    num_rounds, seed = int(cfg["num_rounds"]), int(cfg["seed"])
    scfg = cfg["strategy"]
    timeout = float(cfg["runtime"].get("round_timeout_s", 3600))
    device = resolve_device(str(cfg["device"]))
    test = DecodedCache.open(plan.test_cache)
    model = build_model(str(cfg["model"]["name"]), plan.num_classes).to(device)
    arrays = ArrayRecord(plan.initial_state)
    recorder = RunRecorder(plan.run_dir, plan.history)
    ckpt_meta = {"arch": str(cfg["model"]["name"]), "num_classes": plan.num_classes}
    t_start = time.perf_counter()

    def central_eval() -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        res = evaluate(
            model, test.images, test.labels, batch_size=int(cfg["eval_batch_size"]), device=device
        )
        return float(res.accuracy), float(res.loss)

    node_of = discover_clients(
        grid, int(cfg["num_clients"]), float(cfg["runtime"].get("connect_timeout_s", 120))
    )
    partition_of = {n: p for p, n in node_of.items()}

    if plan.start_round == 0:
        acc, loss = central_eval()
        recorder.append({"round": 0, "accuracy": acc, "loss": loss, "train_loss": None})

    bar = tqdm(
        total=num_rounds,
        initial=plan.start_round,
        desc="rounds",
        unit="round",
        disable=not cfg.get("progress", True),
        dynamic_ncols=True,
    )
    for rnd in range(plan.start_round + 1, num_rounds + 1):
        t0 = time.perf_counter()
        pids = sample_clients(node_of, scfg["fraction_train"], scfg["min_train_nodes"], seed, rnd)
        config = ConfigRecord(train_config(cfg, rnd, plan.num_classes))
        view = _NodesView(grid, [node_of[p] for p in pids])
        messages = list(strategy.configure_train(rnd, arrays, config, view))
        bytes_down = arrays.count_bytes() * len(messages)
        replies = _replies_in_partition_order(
            grid.send_and_receive(messages, timeout=timeout), partition_of
        )
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            raise FedvisionError(
                f"round {rnd}: every client failed; first: {_first_error(replies)}"
            )
        if len(ok) < len(messages):
            # Counted in metrics.jsonl too; said here so that nobody misses it.
            tqdm.write(
                f"fedvision: round {rnd}: {len(messages) - len(ok)} of {len(messages)} clients "
                f"failed ({_first_error(replies)}); aggregating the other {len(ok)}",
                file=sys.stderr,
            )
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        bytes_up = sum(a.count_bytes() for m in ok for a in m.content.array_records.values())
        record: dict[str, Any] = {
            "round": rnd,
            "accuracy": None,
            "loss": None,
            "train_loss": train_metrics.get(C.KEY_TRAIN_LOSS) if train_metrics else None,
            "train_accuracy": train_metrics.get(C.KEY_TRAIN_ACC) if train_metrics else None,
            "num_clients": len(ok),
            "num_failures": len(messages) - len(ok),
            "clients": pids,
            "lr": config["lr"],
            "bytes_down": int(bytes_down),
            "bytes_up": int(bytes_up),
        }
        record.update(
            _federated_evaluate(grid, strategy, arrays, config, cfg, rnd, node_of, timeout)
        )
        if rnd % int(cfg["eval_every"]) == 0 or rnd == num_rounds:
            record["accuracy"], record["loss"] = central_eval()
        else:
            model.load_state_dict(arrays.to_torch_state_dict())
        record["round_s"] = round(time.perf_counter() - t0, 3)
        recorder.append(record)
        best_acc, best_round = recorder.best
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = {**ckpt_meta, "round": rnd, "best_accuracy": best_acc, "best_round": best_round}
        _save_checkpoint(plan.run_dir / C.CKPT_LATEST, state, meta)
        if best_round == rnd:
            _save_checkpoint(plan.run_dir / C.CKPT_BEST, state, meta)
        bar.set_postfix(acc=_fmt(record["accuracy"]), loss=_fmt(record["loss"]), refresh=False)
        bar.update(1)
    bar.close()
    return recorder.finish(num_rounds=num_rounds, wall_s=time.perf_counter() - t_start)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _federated_evaluate(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    config: ConfigRecord,
    cfg: Mapping[str, Any],
    rnd: int,
    node_of: Mapping[int, int],
    timeout: float,
) -> dict[str, Any]:
    """Clients evaluate the global model on their local validation parts (when configured)."""
    scfg = cfg["strategy"]
    if float(scfg.get("fraction_evaluate", 0.0)) <= 0.0:
        return {}
    # Seeded apart from the train draw (round -> 10**6 + round) so both samples are independent.
    pids = sample_clients(
        node_of,
        scfg["fraction_evaluate"],
        scfg.get("min_evaluate_nodes", 0),
        cfg["seed"],
        10**6 + rnd,
    )
    view = _NodesView(grid, [node_of[p] for p in pids])
    messages = list(strategy.configure_evaluate(rnd, arrays, config, view))
    replies = [
        m
        for m in grid.send_and_receive(messages, timeout=timeout)
        # A client whose validation part is empty has nothing to say (and a zero weight would
        # divide by zero if every sampled client were such a client).
        if m.has_error() or m.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES] > 0
    ]
    metrics: MetricRecord | None = strategy.aggregate_evaluate(rnd, replies)
    if metrics is None:
        return {"val_accuracy": None, "val_loss": None}
    return {"val_accuracy": metrics.get(C.KEY_VAL_ACC), "val_loss": metrics.get(C.KEY_VAL_LOSS)}
