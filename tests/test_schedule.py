"""Schedules and optimisers (fedvision.engine.schedule) and the one settings-to-TrainConfig path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedvision import constants as C
from fedvision.engine import TrainConfig
from fedvision.engine.schedule import (
    make_optimizer,
    param_groups,
    set_lr,
    warmup_cosine,
    warmup_cosine_epoch,
)
from fedvision.errors import FedvisionError
from fedvision.fl.round_config import to_train_config


def _net() -> nn.Module:
    # find_head finds `fc`: the head's group and the backbone's.
    net = nn.Module()
    net.body = nn.Linear(3, 4)
    net.fc = nn.Linear(4, 2)
    return net


def test_epoch_slices_make_up_the_whole_warmup_cosine_run():
    epochs, steps, warmup_epochs, lr, lr_min = 3, 4, 0.5, 0.1, 0.01
    sliced = [
        warmup_cosine_epoch(e, steps, epochs, warmup_epochs, lr, lr_min)(s)
        for e in range(epochs)
        for s in range(steps)
    ]
    # 0.5 epochs of 4 steps: a 2-step warm-up; the cosine ends at lr_min on the last step.
    whole = [warmup_cosine(i, epochs * steps, 2, lr, lr_min) for i in range(epochs * steps)]
    assert sliced == whole
    assert sliced[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr]) and sliced[-1] == pytest.approx(
        lr_min
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_make_optimizer_builds_the_named_optimiser(name, kind):
    net = _net()
    cfg = TrainConfig(optimizer=name, lr=0.2, momentum=0.5, weight_decay=0.01)
    opt = make_optimizer(net, list(net.parameters()), cfg)
    assert type(opt) is kind
    (group,) = opt.param_groups
    assert group["lr"] == 0.2 and group["weight_decay"] == 0.01 and group["lr_factor"] == 1.0
    if name == "sgd":
        assert group["momentum"] == 0.5


def test_backbone_factor_gives_two_groups_and_set_lr_scales_both():
    net = _net()
    cfg = TrainConfig(lr=0.1, backbone_lr_factor=0.25)
    groups = param_groups(net, list(net.parameters()), cfg)
    head, body = groups
    assert {id(p) for p in head["params"]} == {id(p) for p in net.fc.parameters()}
    assert {id(p) for p in body["params"]} == {id(p) for p in net.body.parameters()}
    assert (head["lr"], body["lr"]) == (0.1, 0.1 * 0.25)
    opt = make_optimizer(net, list(net.parameters()), cfg)
    set_lr(opt.param_groups, 0.04)
    assert [g["lr"] for g in opt.param_groups] == [0.04, 0.04 * 0.25]


def _record(**drop_or_set):
    record = {
        C.KEY_LOCAL_EPOCHS: 2, C.KEY_LOCAL_STEPS: -1, C.KEY_BATCH_SIZE: 8, C.KEY_LR: 0.05,
        C.KEY_OPTIMIZER: "sgd", C.KEY_MOMENTUM: 0.9, C.KEY_WEIGHT_DECAY: 0.0,
        C.KEY_AUGMENT: "none", C.KEY_SEED: 3, C.KEY_SERVER_ROUND: 2,
    }  # fmt: skip
    record.update(drop_or_set)
    return {k: v for k, v in record.items() if v is not None}


def test_a_round_record_reads_through_the_shared_translator():
    tc = to_train_config(_record(), partition_id=1)
    assert (tc.epochs, tc.max_steps, tc.batch_size, tc.lr, tc.weight_decay) == (
        2,
        None,
        8,
        0.05,
        0.0,
    )
    # The run's seed is not the client's: each (round, client) derives its own.
    assert tc.seed != 3
    assert to_train_config(_record(**{C.KEY_LOCAL_STEPS: 5}), 1).max_steps == 5


def test_a_round_record_without_a_setting_every_round_sends_is_refused():
    with pytest.raises(FedvisionError, match="lack batch_size"):
        to_train_config(_record(**{C.KEY_BATCH_SIZE: None}), partition_id=0)


def test_fixed_fields_win_over_the_mapping_and_must_exist():
    tc = TrainConfig.from_mapping({"lr": 0.5, "epochs": 9}, epochs=1, lr=0.1)
    assert (tc.epochs, tc.lr) == (1, 0.1)
    with pytest.raises(TypeError, match="no field 'learning_rate'"):
        TrainConfig.from_mapping({}, learning_rate=0.1)
