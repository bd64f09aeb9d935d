"""Flower ClientApp: receives global weights and a round config, calls the engine, replies.

``app`` is a module-level object that any runtime loads by name (``fedvision.fl.clientapp:app``).
A client learns where its data lives and which device to use from its node config
(``cache-dir``, ``partition-file``, ``device``: how a real SuperNode is started); whatever the
node config leaves out comes from the run directory that the Flower run config names
(``run-dir``), which is how every simulated client finds the shared cache and partition.

No training loop lives here (that is ``fedvision.engine``). What a client needs across rounds (the
decoded cache view, its partition, a built model) is kept by ``functools.lru_cache`` in the worker
process, so a round moves only weights and config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvision import constants as C
from fedvision.data.cache import DecodedCache
from fedvision.data.partition import Partition, load_partition
from fedvision.engine import evaluate, resolve_device, train_local
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import float32_arrays
from fedvision.fl.round_config import to_train_config
from fedvision.models import build_model
from fedvision.rundir import RunPlan, read_plan, run_dir_from

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _open_cache(cache_dir: str) -> DecodedCache:
    # A read-only memmap: every worker of the machine shares the same page cache.
    return DecodedCache.open(Path(cache_dir))


@functools.lru_cache(maxsize=2)
def _open_partition(partition_file: str) -> Partition:
    return load_partition(Path(partition_file))


@functools.lru_cache(maxsize=1)
def _model(name: str, num_classes: int, finetune: str, last_k: int, device: str) -> torch.nn.Module:
    # One model per worker, reused by every client it serves: FedAvg/FedProx clients are
    # stateless, so each round simply overwrites the weights with the global ones.
    return build_model(name, num_classes, finetune=finetune, last_k=last_k).to(device)


@functools.lru_cache(maxsize=2)
def _plan(run_dir: str) -> RunPlan:
    return read_plan(Path(run_dir))


def node_settings(context: Context) -> dict[str, Any]:
    """This client's settings: its node config, completed from the run directory's plan."""
    node = dict(context.node_config)
    needed = (C.NODE_CACHE_DIR, C.NODE_PARTITION_FILE, C.NODE_DEVICE)
    # Only a node that lacks something reads the plan: a real client's own data lives on its
    # machine, where the server's run directory does not exist.
    if any(k not in node for k in needed) and C.RUN_DIR_KEY in context.run_config:
        plan = _plan(str(run_dir_from(context.run_config)))
        node.setdefault(C.NODE_CACHE_DIR, plan.train_cache)
        node.setdefault(C.NODE_PARTITION_FILE, plan.partition_file)
        node.setdefault(C.NODE_DEVICE, plan.client_device)
    for key in (C.KEY_PARTITION_ID, C.NODE_CACHE_DIR, C.NODE_PARTITION_FILE):
        if key not in node:
            raise FedvisionError(
                f"this client lacks {key!r}: start its SuperNode with --node-config "
                f'"{C.KEY_PARTITION_ID}=0 {C.NODE_CACHE_DIR}=... {C.NODE_PARTITION_FILE}=..." '
                f"or run it with a run directory ({C.RUN_DIR_KEY} in the run config)"
            )
    return node


def _indices(node: Mapping[str, Any]) -> tuple[DecodedCache, np.ndarray, np.ndarray]:
    cache = _open_cache(str(node[C.NODE_CACHE_DIR]))
    part = _open_partition(str(node[C.NODE_PARTITION_FILE]))
    pid = int(node[C.KEY_PARTITION_ID])
    if not 0 <= pid < len(part.train):
        raise FedvisionError(
            f"partition-id {pid} is out of range: the partition file has {len(part.train)} clients"
        )
    return cache, part.train[pid], part.val[pid]


def _load_global(msg: Message, node: Mapping[str, Any]) -> torch.nn.Module:
    cfg = msg.content[C.KEY_CONFIG]
    device = resolve_device(str(node.get(C.NODE_DEVICE, "auto")))
    model = _model(
        str(cfg["model-name"]),
        int(cfg["num-classes"]),
        str(cfg["model-finetune"]),
        int(cfg["model-last-k"]),
        str(device),
    )
    model.load_state_dict(msg.content[C.KEY_ARRAYS].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this client's partition; reply with weights and metrics."""
    node = node_settings(context)
    cache, train_idx, _ = _indices(node)
    model = _load_global(msg, node)
    cfg = to_train_config(msg.content[C.KEY_CONFIG], int(node[C.KEY_PARTITION_ID]))
    device = next(model.parameters()).device
    result = train_local(model, cache.images, cache.labels, train_idx, cfg, device)
    metrics = MetricRecord(
        {
            C.KEY_NUM_EXAMPLES: int(result.num_examples),
            C.KEY_TRAIN_LOSS: float(result.loss),
            C.KEY_TRAIN_ACC: float(result.accuracy),
            C.KEY_TRAIN_SECONDS: float(result.seconds),
        }
    )
    content = RecordDict({C.KEY_ARRAYS: float32_arrays(model.state_dict()), C.KEY_METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's local validation part."""
    node = node_settings(context)
    cache, _, val_idx = _indices(node)
    model = _load_global(msg, node)
    device = next(model.parameters()).device
    res = evaluate(model, cache.images, cache.labels, val_idx, device=device)
    metrics = MetricRecord(
        {
            # A client without a local validation part reports weight 0 (it cannot vote).
            C.KEY_NUM_EXAMPLES: int(res.num_examples),
            C.KEY_VAL_LOSS: float(res.loss),
            C.KEY_VAL_ACC: float(res.accuracy),
        }
    )
    return Message(content=RecordDict({C.KEY_METRICS: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which partition this node holds, and prove its data opens."""
    # Answered once at start: tells the server which partition this node holds (node ids are
    # random, partition ids are not, so the server samples by partition id reproducibly) and
    # proves the node's data opens before any round starts.
    node = node_settings(context)
    _, train_idx, val_idx = _indices(node)
    metrics = MetricRecord(
        {
            C.KEY_PARTITION_ID: int(node[C.KEY_PARTITION_ID]),
            C.KEY_NUM_TRAIN: len(train_idx),
            C.KEY_NUM_VAL: len(val_idx),
        }
    )
    return Message(content=RecordDict({C.KEY_METRICS: metrics}), reply_to=msg)
