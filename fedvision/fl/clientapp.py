"""Flower ClientApp: receives global weights and a round config, calls the engine, replies.

``app`` is a module-level object that any runtime loads by name (``fedvision.fl.clientapp:app``).
A client learns where its data lives and which device to use from its node config
(``cache-dir``, ``partition-file``, ``device``: how a real SuperNode is started); whatever the
node config leaves out comes from the run directory that the Flower run config names
(``run-dir``), which is how every simulated client finds the shared cache and partition.

No training loop lives here (that is ``fedvision.engine``). What a client needs across rounds (the
decoded cache view, its partition, a built model, the run's initial weights) is kept by
``functools.lru_cache`` in the worker process, so a round moves only weights and config.

Messages carry only the trained parameters (``shared``) and, beside them, the running statistics
of the BatchNorm layers that train (``fedvision.fl.parts``); the client completes the model (a
frozen backbone, FedBN's local layers) from the run's initial weights (node config
``initial-weights``, else ``<run-dir>/initial_weights.pt``), after checking them against the
server's fingerprint. Under FedBN a client's own BatchNorm lives in its Flower ``Context.state``,
which Flower keeps per node for the whole run (the simulation engine and a SuperNode alike): the
worker's caches are shared by the clients it serves, the Context is not.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvision import constants as C
from fedvision.data.cache import DecodedCache
from fedvision.data.partition import Partition, load_partition
from fedvision.engine import evaluate, resolve_device, train_local
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import pack_tensors, unpack_tensors
from fedvision.fl.client_state import StateStore, client_state
from fedvision.fl.round_config import to_train_config
from fedvision.models import ModelParts, build_model, fingerprint, split_parts
from fedvision.privacy.client import clipping_mod, dpsgd_config, equal_weights
from fedvision.privacy.dpsgd import train_local_dpsgd
from fedvision.rundir import RunPlan, read_plan, run_dir_from
from strategies.scaffold import (
    grad_correction,
    packed_record,
    read_controls,
    store_controls,
    update_controls,
)

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
    # One model per worker, reused by every client it serves: each message overwrites every
    # weight (received, base or the client's own), so nothing leaks from one client to the next.
    return build_model(name, num_classes, finetune=finetune, last_k=last_k).to(device)


@functools.lru_cache(maxsize=2)
def _parts(
    name: str,
    num_classes: int,
    finetune: str,
    last_k: int,
    device: str,
    local_bn: bool,
    bn_eval: bool,
) -> ModelParts:
    model = _model(name, num_classes, finetune, last_k, device)
    return split_parts(model, local_bn=local_bn, bn_eval=bn_eval)


@functools.lru_cache(maxsize=1)
def _base(path: str, stamp: tuple[int, int]) -> dict[str, torch.Tensor]:
    # `stamp` (mtime, size) makes a rewritten file a new cache entry.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise FedvisionError(f"cannot read initial weights {path}: {exc}".splitlines()[0]) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a run checkpoint
        obj = obj["model"]
    return dict(obj)


@functools.lru_cache(maxsize=2)
def _base_fingerprint(path: str, stamp: tuple[int, int], keys: tuple[str, ...]) -> str:
    base = _base(path, stamp)
    missing = [k for k in keys if k not in base]
    if missing:
        raise FedvisionError(
            f"initial weights {path} lack {', '.join(missing[:3])}: not this run's model"
        )
    return fingerprint(base, keys)


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
    if C.NODE_INITIAL_WEIGHTS not in node and C.RUN_DIR_KEY in context.run_config:
        node[C.NODE_INITIAL_WEIGHTS] = str(run_dir_from(context.run_config) / C.RUN_INITIAL)
    for key in (C.KEY_PARTITION_ID, C.NODE_CACHE_DIR, C.NODE_PARTITION_FILE):
        if key not in node:
            raise FedvisionError(
                f"this client lacks {key!r}: start its SuperNode with --node-config "
                f'"{C.KEY_PARTITION_ID}=0 {C.NODE_CACHE_DIR}=... {C.NODE_PARTITION_FILE}=..." '
                f"or run it with a run directory ({C.RUN_DIR_KEY} in the run config)"
            )
    return node


def client_indices(node: Mapping[str, Any]) -> tuple[DecodedCache, np.ndarray, np.ndarray]:
    """This client's decoded cache and its train and validation indices (cached per worker)."""
    cache = _open_cache(str(node[C.NODE_CACHE_DIR]))
    part = _open_partition(str(node[C.NODE_PARTITION_FILE]))
    # A real client's own data is a one-client file (partition-index 0), whatever its id.
    pid = int(node.get(C.NODE_PARTITION_INDEX, node[C.KEY_PARTITION_ID]))
    if not 0 <= pid < len(part.train):
        raise FedvisionError(
            f"partition {pid} is out of range: the partition file has {len(part.train)} clients"
        )
    return cache, part.train[pid], part.val[pid]


def _base_weights(
    node: Mapping[str, Any], parts: ModelParts, expected: str
) -> dict[str, torch.Tensor]:
    """The run's initial weights, checked against the server's fingerprint of the unsent part."""
    path = Path(str(node.get(C.NODE_INITIAL_WEIGHTS, "")))
    if not path.is_file():
        raise FedvisionError(
            f"this client needs the run's initial weights (what it is not sent), but "
            f"{str(path) or 'none'} is no file: copy the run's {C.RUN_INITIAL} here and start the "
            f'SuperNode with --node-config "{C.NODE_INITIAL_WEIGHTS}=/path/to/{C.RUN_INITIAL}"'
        )
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    got = _base_fingerprint(str(path), stamp, parts.unsent)
    if got != expected:
        raise FedvisionError(
            f"initial weights {path} do not match the server's (fingerprint {got[:12]}, server "
            f"{expected[:12] or 'none'}): give this client the run's own {C.RUN_INITIAL}"
        )
    return _base(str(path), stamp)


def _own_batchnorm(
    store: StateStore, parts: ModelParts, base: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], bool]:
    """FedBN: this client's BatchNorm from its store, else the base's; and whether it is new."""
    record = store.get(C.STATE_LOCAL_BN)
    if record is None:
        return {k: base[k] for k in parts.local}, True
    if set(record.keys()) != set(parts.local):
        raise FedvisionError(
            f"this client's stored BatchNorm ({len(record)} arrays) does not fit the model's "
            f"{len(parts.local)} local arrays; the run's model changed under the client"
        )
    return record.to_torch_state_dict(), False


def _load_global(
    msg: Message, node: Mapping[str, Any], store: StateStore
) -> tuple[torch.nn.Module, ModelParts, bool]:
    """The model of this round: received arrays, completed from the base and (FedBN) own BN.

    Returns the model, its parts, and whether its BatchNorm started from the base this time.
    """
    return load_global(
        msg.content[C.KEY_CONFIG], msg.content[C.KEY_ARRAYS], node, store,
        stats=msg.content.array_records.get(C.KEY_BN_STATS),
    )  # fmt: skip


def load_global(
    cfg: Mapping[str, Any],
    arrays: ArrayRecord,
    node: Mapping[str, Any],
    store: StateStore,
    stats: ArrayRecord | None = None,
) -> tuple[torch.nn.Module, ModelParts, bool]:
    """The model of a round config ``cfg``, packed parameters ``arrays`` and packed BatchNorm
    ``stats`` (also for the SecAgg+ client); ``store``: the client's state (FedBN: its BatchNorm).

    Returns the model, its parts, and whether its BatchNorm started from the base this time.
    """
    device = resolve_device(str(node.get(C.NODE_DEVICE, "auto")))
    key = (
        str(cfg[C.KEY_MODEL_NAME]),
        int(cfg[C.KEY_NUM_CLASSES]),
        str(cfg[C.KEY_MODEL_FINETUNE]),
        int(cfg[C.KEY_MODEL_LAST_K]),
        str(device),
    )
    model = _model(*key)
    bn_eval = str(cfg.get(C.KEY_BN_MODE, "train")) == "eval"
    parts = _parts(*key, bool(cfg.get(C.KEY_LOCAL_BN, False)), bn_eval)
    full = model.state_dict()
    try:
        state = unpack_tensors(arrays, {k: tuple(full[k].shape) for k in parts.shared})
    except FedvisionError as exc:
        raise FedvisionError(
            f"{exc} (this client's {key[0]}, finetune={key[2]}, last_k={key[3]}, shares "
            f"{len(parts.shared)} arrays)"
        ) from exc
    if parts.stats:
        if stats is None:
            raise FedvisionError(
                f"the server sent no BatchNorm statistics, but this client's {key[0]} trains "
                f"{len(parts.stats)} of them: client and server run different fedvision versions"
            )
        state.update(unpack_tensors(stats, {k: tuple(full[k].shape) for k in parts.stats}))
    # Counters never travel and no layer reads them: the model keeps its own.
    state.update({k: full[k] for k in parts.counters})
    new_bn = False
    if parts.unsent:
        base = _base_weights(node, parts, str(cfg.get(C.KEY_BASE_FINGERPRINT, "")))
        state.update({k: base[k] for k in parts.frozen})
        own, new_bn = _own_batchnorm(store, parts, base)
        state.update(own)
    model.load_state_dict(state)
    return model, parts, new_bn


# Flower's client-side clipping mods run on training only and only when the round config asks
# (fedvision.privacy.client.clipping_mod): attached to the whole app, they break evaluate replies.
@app.train(mods=[clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this client's partition; reply with weights and metrics."""
    node = node_settings(context)
    cache, train_idx, _ = client_indices(node)
    record = msg.content[C.KEY_CONFIG]
    store = client_state(record, context, int(node[C.KEY_PARTITION_ID]))
    model, parts, new_bn = _load_global(msg, node, store)
    cfg = to_train_config(record, int(node[C.KEY_PARTITION_ID]))
    device = next(model.parameters()).device
    controls = read_controls(msg, store, model, parts.shared, cfg.optimizer)  # SCAFFOLD only
    dp = dpsgd_config(record)
    if dp is None:
        result = train_local(
            model, cache.images, cache.labels, train_idx, cfg, device,
            grad_correction=(
                None if controls is None else grad_correction(controls, model, parts.shared)
            ),
        )  # fmt: skip
    else:
        # Sample-level DP-SGD (never with SCAFFOLD: check_privacy refuses the pair). The epsilon
        # composes every DP-SGD step this client took in the run: the server keeps the counts
        # (in its checkpoint, so a resumed run continues them) and this node's Context keeps its
        # own (steps of a reply the server never got); the larger one counts.
        done = context.state.get(C.STATE_DPSGD)
        pid = int(node[C.KEY_PARTITION_ID])
        server_steps = list(record.get(C.KEY_DPSGD_PRIOR, []))
        prior = max(
            int(done[C.KEY_DPSGD_STEPS]) if done is not None else 0,
            int(server_steps[pid]) if pid < len(server_steps) else 0,
        )
        result = train_local_dpsgd(
            model, cache.images, cache.labels, train_idx, cfg, dp, device, prior_steps=prior
        )
        context.state[C.STATE_DPSGD] = ConfigRecord({C.KEY_DPSGD_STEPS: result.total_steps})
    metrics = MetricRecord(
        {
            # Client-level DP calibrates its noise to a plain mean: every client weighs 1.
            C.KEY_NUM_EXAMPLES: 1 if equal_weights(record) else int(result.num_examples),
            C.KEY_NUM_TRAIN: int(result.num_examples),
            C.KEY_TRAIN_LOSS: float(result.loss),
            C.KEY_TRAIN_ACC: float(result.accuracy),
            C.KEY_TRAIN_SECONDS: float(result.seconds),
            # The local work: FedNova normalises by the steps and the SGD momentum they ran
            # with (Adam has none; FedNova refuses it); the simulated clock (fedvision.system)
            # times the samples.
            C.KEY_STEPS: int(result.steps),
            C.KEY_MOMENTUM: float(cfg.momentum if cfg.optimizer == "sgd" else 0.0),
            C.KEY_TRAIN_SAMPLES: int(result.samples_seen),
        }
    )
    if dp is not None:
        metrics[C.KEY_DPSGD_EPSILON] = float(result.epsilon)
        metrics[C.KEY_DPSGD_STEPS] = int(result.total_steps)
    state = model.state_dict()
    if parts.local:
        # FedBN: the client's BatchNorm (dtypes kept) waits in its state for its next round.
        store[C.STATE_LOCAL_BN] = ArrayRecord(
            {k: Array(state[k].detach().cpu().numpy()) for k in parts.local}
        )
        metrics[C.KEY_NEW_BN] = int(new_bn)
    shared = pack_tensors({k: state[k] for k in parts.shared})
    content = RecordDict({C.KEY_ARRAYS: shared, C.KEY_METRICS: metrics})
    if parts.stats:
        content[C.KEY_BN_STATS] = pack_tensors({k: state[k] for k in parts.stats})
    if controls is not None:
        # SCAFFOLD: c_i+ waits in the client's state for its next round; the server gets the change.
        c_i, delta = update_controls(
            controls, msg.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy(), shared[C.KEY_FLAT].numpy(),
            result.steps, cfg.lr, cfg.momentum,
        )  # fmt: skip
        store_controls(store, c_i)
        content[C.KEY_CONTROL_DELTA] = packed_record(delta)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model (under FedBN: with this client's BatchNorm) on local validation."""
    node = node_settings(context)
    cache, _, val_idx = client_indices(node)
    record = msg.content[C.KEY_CONFIG]
    store = client_state(record, context, int(node[C.KEY_PARTITION_ID]), evaluating=True)
    model, _, _ = _load_global(msg, node, store)
    device = next(model.parameters()).device
    res = evaluate(
        model, cache.images, cache.labels, val_idx, device=device,
        normalise=str(record.get(C.KEY_NORMALISE, "imagenet")),
    )  # fmt: skip
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
    _, train_idx, val_idx = client_indices(node)
    metrics = MetricRecord(
        {
            C.KEY_PARTITION_ID: int(node[C.KEY_PARTITION_ID]),
            C.KEY_NUM_TRAIN: len(train_idx),
            C.KEY_NUM_VAL: len(val_idx),
        }
    )
    return Message(content=RecordDict({C.KEY_METRICS: metrics}), reply_to=msg)
