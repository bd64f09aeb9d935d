"""The one owner of a run's checkpoints: global model, strategy state, round, RNG, best, horizon.

A checkpoint holds everything the server needs to continue a run exactly where it stopped:
- ``model``: the global arrays as the strategy produced them (dtypes kept, so a resumed round
  starts from bit-identical arrays; ``model.weights=<ckpt>`` loads it like any state dict);
- ``strategy``: what a strategy keeps between rounds (FedAdam/FedYogi/FedAdagrad moments,
  FedAvgM's momentum buffer, an adaptive clipping norm), for every strategy in a wrapper chain;
- ``round``, the RNG states of ``random``, numpy and torch, the best round chosen on validation
  data, and ``lr_horizon`` (the rounds the learning-rate schedule spans, fixed when a run starts);
- ``dpsgd_steps``: the DP-SGD steps each client (by partition id) took so far, which its epsilon
  composes; a client's Flower Context does not survive a resumed simulation, the server's does.

Everything is stored as tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it without unpickling code.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedvision.atomic import fsync_dir, save_torch_atomic, write_with
from fedvision.errors import FedvisionError

FORMAT = 2
# Attributes a strategy rebuilds from the global model at every configure_train call (FedOpt,
# FedAvgM, QFedAvg and the DP wrappers all keep the current global arrays): not worth storing.
REBUILT_EACH_ROUND = frozenset({"current_arrays"})
# Scalars that change between rounds (an adaptive clipping norm); every other scalar attribute of
# a strategy is a hyper-parameter and must come from the config, not from an old checkpoint.
STATE_SCALARS = ("clipping_norm",)


@dataclass
class Checkpoint:
    """What a checkpoint holds (see the module docstring)."""

    model: dict[str, torch.Tensor]
    arch: str
    num_classes: int
    round: int
    lr_horizon: int
    strategy: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    best_round: int | None = None
    best_value: float | None = None
    dpsgd_steps: dict[int, int] = field(default_factory=dict)

    def arrays(self) -> ArrayRecord:
        """The global model as the ArrayRecord the server sends out."""
        return ArrayRecord({k: Array(v.numpy()) for k, v in self.model.items()})


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (Flower's wrappers keep theirs in ``.strategy``)."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def _is_array(value: Any) -> bool:
    # Strategies compute on 0-d arrays too (BatchNorm's counter), and numpy turns those results
    # into scalars (np.float32): both are state.
    return isinstance(value, np.ndarray | np.generic)


def _encode(value: Any) -> dict[str, Any] | None:
    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "value": value.to_torch_state_dict()}
    if isinstance(value, dict) and value and all(_is_array(v) for v in value.values()):
        value = {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
        return {"kind": "ndarray_dict", "value": value}
    if isinstance(value, list) and value and all(_is_array(v) for v in value):
        return {"kind": "ndarray_list", "value": [torch.from_numpy(np.asarray(v)) for v in value]}
    return None


def _decode(item: Mapping[str, Any]) -> Any:
    kind, value = item["kind"], item["value"]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(v.numpy()) for k, v in value.items()})
    if kind == "ndarray_dict":
        return {k: v.numpy() for k, v in value.items()}
    if kind == "ndarray_list":
        return [v.numpy() for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Collect what every strategy in the chain keeps between rounds.

    Array-valued attributes (moments, momentum buffers) are found generically, so a strategy that
    adds one is covered without a change here; ``current_arrays`` is left out (rebuilt each round).
    """
    state: dict[str, Any] = {}
    for depth, s in enumerate(strategy_chain(strategy)):
        for name, value in vars(s).items():
            if name in REBUILT_EACH_ROUND:
                continue
            if name in STATE_SCALARS and isinstance(value, int | float):
                state[f"{depth}.{name}"] = {"kind": "scalar", "value": float(value)}
            elif (encoded := _encode(value)) is not None:
                state[f"{depth}.{name}"] = encoded
        state[f"{depth}.__class__"] = {"kind": "class", "value": type(s).__qualname__}
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Put state from :func:`strategy_state` back into a freshly built strategy of the same kind."""
    chain = strategy_chain(strategy)
    for key, item in state.items():
        depth_s, name = key.split(".", 1)
        depth = int(depth_s)
        if depth >= len(chain):
            raise FedvisionError(
                f"the checkpoint's strategy state has {key!r}, but the strategy chain is only "
                f"{len(chain)} deep; resume with the strategy the run started with"
            )
        if name == "__class__":
            if type(chain[depth]).__qualname__ != item["value"]:
                raise FedvisionError(
                    f"the checkpoint was written by strategy {item['value']}, not "
                    f"{type(chain[depth]).__qualname__}; resume with the run's own strategy"
                )
            continue
        setattr(chain[depth], name, _decode(item))


def rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's global generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically: a crash mid-write never leaves a broken checkpoint behind."""
    payload = {
        "format": FORMAT,
        "model": ckpt.model,
        "arch": ckpt.arch,
        "num_classes": ckpt.num_classes,
        "round": ckpt.round,
        "lr_horizon": ckpt.lr_horizon,
        "strategy": ckpt.strategy,
        "rng": ckpt.rng,
        "best_round": ckpt.best_round,
        "best_value": ckpt.best_value,
        "dpsgd_steps": {int(k): int(v) for k, v in ckpt.dpsgd_steps.items()},
    }
    save_torch_atomic(path, payload)


def load_checkpoint(path: Path, *, arch: str, num_classes: int) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` and check it fits the run.

    Raises
    ------
    FedvisionError
        The file is missing, unreadable, of another format, or for another model.
    """
    if not path.is_file():
        raise FedvisionError(f"no checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise FedvisionError(f"cannot read checkpoint {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise FedvisionError(
            f"{path} is not a fedvision run checkpoint (format {FORMAT}); resume needs the "
            "checkpoint_latest.pt of a run made by this version"
        )
    if raw["arch"] != arch or int(raw["num_classes"]) != num_classes:
        raise FedvisionError(
            f"{path} holds a {raw['arch']} with {raw['num_classes']} classes; this run has a "
            f"{arch} with {num_classes} classes"
        )
    return Checkpoint(
        model=raw["model"],
        arch=raw["arch"],
        num_classes=int(raw["num_classes"]),
        round=int(raw["round"]),
        lr_horizon=int(raw["lr_horizon"]),
        strategy=raw["strategy"],
        rng=raw["rng"],
        best_round=raw["best_round"],
        best_value=raw["best_value"],
        # Checkpoints written before DP-SGD steps were kept here hold none.
        dpsgd_steps={int(k): int(v) for k, v in raw.get("dpsgd_steps", {}).items()},
    )


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where the file system allows, else a copy.

    The copy is written as every checkpoint is (:func:`~fedvision.atomic.write_with`: temporary
    file, fsync, rename), so a copy cut short leaves the previous ``dst`` and no stray file.
    """
    # The best checkpoint is the latest one of its round: a hard link costs no second write, and
    # its bytes are already on disk (the latest was written atomically).
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            write_with(dst, lambda out: shutil.copyfileobj(f, out))
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)
