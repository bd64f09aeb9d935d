"""The checkpoint module: strategy state, RNG state and the file format survive a save/load."""

from __future__ import annotations

import errno
import os
import random
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hydra.utils import instantiate

from fedvision import constants as C
from fedvision.atomic import save_torch_atomic
from fedvision.config import CONF_DIR, compose_config
from fedvision.errors import FedvisionError
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
from strategies.sampling import SeededSampling

pytestmark = pytest.mark.usefixtures("task_identity")

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


def _build(name: str) -> SeededSampling:
    strategy = SeededSampling(instantiate(compose_config([f"strategy={name}"]).strategy), seed=0)
    strategy.set_partitions({n: n - 1 for n in range(1, 11)})
    return strategy


def _round(strategy, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
    """One round with ten fixed client replies (distinct weights, sizes and losses)."""
    sent = list(strategy.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    rng = np.random.default_rng(rnd)
    replies = [
        Message(
            content=RecordDict(
                {
                    C.KEY_ARRAYS: ArrayRecord(
                        {
                            "w": Array(
                                (arrays["w"].numpy() + rng.normal(size=4)).astype(np.float32)
                            ),
                            # 0-d, like BatchNorm's counter: numpy makes results of it scalars.
                            "n": Array(np.asarray(arrays["n"].numpy() + 1 + i, dtype=np.float32)),
                        }
                    ),
                    C.KEY_METRICS: MetricRecord(
                        {
                            C.KEY_NUM_EXAMPLES: 5 + i,
                            C.KEY_TRAIN_LOSS: 0.5 + 0.1 * i,
                            C.KEY_STEPS: 2 + i,  # FedNova normalises by the local work
                            C.KEY_MOMENTUM: 0.5,
                        }
                    ),
                }
            ),
            dst_node_id=1,
            message_type="train",
        )
        for i in range(10)
    ]
    if C.KEY_CONTROL in sent[0].content:  # SCAFFOLD: each client also returns its c_i update
        for i, reply in enumerate(replies):
            reply.content[C.KEY_CONTROL_DELTA] = ArrayRecord(
                {k: Array(np.full(a.shape, 0.1 * i, np.float32)) for k, a in arrays.items()}
            )
    new, _ = strategy.aggregate_train(rnd, replies)
    return new


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_restored_strategy_continues_like_the_uninterrupted_one(name, tmp_path):
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32)), "n": Array(np.zeros((), np.float32))})
    # Uninterrupted: rounds 1, 2, 3 on one object.
    a = _build(name)
    a1 = _round(a, 1, start)
    a3 = _round(a, 3, _round(a, 2, a1))
    # Interrupted after round 1: its state goes through a checkpoint file into a fresh object.
    b = _build(name)
    b1 = _round(b, 1, start)
    ckpt = Checkpoint(
        model={k: torch.from_numpy(a.numpy()) for k, a in b1.items()}, arch="x", num_classes=2,
        round=1,
        lr_horizon=3, strategy=strategy_state(b), rng=rng_state(),
    )  # fmt: skip
    save_checkpoint(tmp_path / "c.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "c.pt", arch="x", num_classes=2)
    c = _build(name)
    restore_strategy_state(c, loaded.strategy)
    c3 = _round(c, 3, _round(c, 2, loaded.arrays()))
    for key in ("w", "n"):
        np.testing.assert_array_equal(c3[key].numpy(), a3[key].numpy())


def test_state_names_what_a_server_optimiser_keeps():
    s = _build("fedadam")
    _round(s, 1, ArrayRecord({"w": Array(np.zeros(4, np.float32)), "n": Array(np.zeros(()))}))
    state = strategy_state(s)
    assert {"1.m_t", "1.v_t"} <= set(state) and "1.current_arrays" not in state
    with pytest.raises(FedvisionError, match="FedAdam"):
        restore_strategy_state(_build("fedyogi"), state)


def test_rng_state_round_trips():
    saved = rng_state()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_wrong_checkpoints_are_refused_with_one_line(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(FedvisionError, match="no checkpoint"):
        load_checkpoint(path, arch="resnet18", num_classes=4)
    torch.save({"w": torch.zeros(2)}, path)  # a bare state dict is a model, not a run checkpoint
    with pytest.raises(FedvisionError, match="not a fedvision run checkpoint"):
        load_checkpoint(path, arch="resnet18", num_classes=4)
    save_checkpoint(
        path, Checkpoint(model={}, arch="resnet18", num_classes=7, round=1, lr_horizon=2)
    )
    with pytest.raises(FedvisionError, match="7 classes"):
        load_checkpoint(path, arch="resnet18", num_classes=4)
    path.write_bytes(b"garbage")
    with pytest.raises(FedvisionError, match="cannot read checkpoint"):
        load_checkpoint(path, arch="resnet18", num_classes=4)


# --- the best checkpoint's copy is atomic (the one writer, fedvision.atomic) ---------------------


def _no_hard_links(monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EXDEV, "no hard links here")

    monkeypatch.setattr(os, "link", refuse)


def test_a_best_copy_cut_short_leaves_the_previous_best(tmp_path, monkeypatch):
    best, latest = tmp_path / C.CKPT_BEST, tmp_path / C.CKPT_LATEST
    save_torch_atomic(best, {"round": 1})
    save_torch_atomic(latest, {"round": 2, "w": torch.arange(1000)})
    _no_hard_links(monkeypatch)

    def half_then_full_disk(src, dst, *args, **kwargs):
        # Either way of copying (file objects or paths) writes 100 bytes, then the disk is full.
        if isinstance(src, str | os.PathLike):
            with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
                return half_then_full_disk(fsrc, fdst)
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", half_then_full_disk)
    monkeypatch.setattr(shutil, "copyfile", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        link_or_copy(latest, best)
    assert torch.load(best, weights_only=True) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.CKPT_BEST, C.CKPT_LATEST]


def test_a_best_copy_is_on_disk_before_it_replaces_the_previous_best(tmp_path, monkeypatch):
    best, latest = tmp_path / C.CKPT_BEST, tmp_path / C.CKPT_LATEST
    save_torch_atomic(best, {"round": 1})
    save_torch_atomic(latest, {"round": 2})
    _no_hard_links(monkeypatch)
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    link_or_copy(latest, best)
    assert torch.load(best, weights_only=True) == {"round": 2}
    # The copy's bytes are flushed before the rename makes them the best checkpoint, then the
    # folder (so the rename itself survives a power cut).
    assert events == ["fsync", "replace", "fsync"]


def test_a_hard_linked_best_keeps_its_round_when_the_latest_moves_on(tmp_path):
    best, latest = tmp_path / C.CKPT_BEST, tmp_path / C.CKPT_LATEST
    save_torch_atomic(latest, {"round": 2})
    link_or_copy(latest, best)
    save_torch_atomic(latest, {"round": 3})  # the next round's latest is a new file
    assert torch.load(best, weights_only=True) == {"round": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.CKPT_BEST, C.CKPT_LATEST]
