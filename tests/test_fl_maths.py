"""Federated maths of the server side, checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedvision import constants as C
from fedvision.engine.schedule import round_lr
from fedvision.errors import FedvisionError
from fedvision.fl.evaluation import federated_evaluate
from fedvision.fl.round_config import to_train_config, train_config
from fedvision.fl.strategy import build_strategy
from strategies.sampling import SeededSampling, draw_partitions

pytestmark = pytest.mark.usefixtures("task_identity")


def _reply(weights: list[float], n: int, loss: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": _array(weights)}),
            "metrics": MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_TRAIN_LOSS: loss}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def _array(values: list[float]):
    from flwr.app import Array

    return Array(np.asarray(values, dtype=np.float32))


def test_fedavg_is_the_example_weighted_mean():
    # Client A holds 1 example, client B 3: the mean weighs B three times as much.
    replies = [_reply([1.0, 2.0], 1, 0.8), _reply([3.0, 6.0], 3, 0.4)]
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [(1 * 1 + 3 * 3) / 4, (2 * 1 + 6 * 3) / 4])
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx((0.8 * 1 + 0.4 * 3) / 4)


def test_fedprox_sends_mu_and_the_client_reads_it():
    cfg = {
        "seed": 3,
        "num_rounds": 4,
        "model": {"name": "resnet18", "finetune": "full", "last_k": 1},
        "client": {
            "local_epochs": 2,
            "local_steps": None,
            "batch_size": 16,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "lr_schedule": "constant",
            "augment": "light",
        },
    }
    config = ConfigRecord(train_config(cfg, 2, num_classes=7))

    class OneNodeGrid:
        def get_node_ids(self):
            return [42]

    msgs = list(
        FedProx(proximal_mu=0.25, min_train_nodes=1, min_available_nodes=1).configure_train(
            2, ArrayRecord(), config, OneNodeGrid()
        )
    )
    sent = msgs[0].content["config"]
    tc = to_train_config(sent, partition_id=5)
    assert tc.proximal_mu == 0.25
    assert (tc.epochs, tc.max_steps, tc.batch_size, tc.lr) == (2, None, 16, 0.1)
    # Same (seed, round, client) -> same seed; another client -> another seed.
    assert tc.seed == to_train_config(sent, 5).seed != to_train_config(sent, 6).seed


def test_head_warmup_rounds_send_a_zero_backbone_factor_then_the_configured_one():
    from fedvision.fl.round_config import check_every_round

    client = {
        "local_epochs": 1, "local_steps": None, "batch_size": 8, "optimizer": "sgd", "lr": 0.01,
        "lr_schedule": "constant", "augment": "none", "bn_mode": "eval",
        "head_warmup_rounds": 2, "backbone_lr_factor": 0.1,
    }  # fmt: skip
    cfg = {"seed": 0, "num_rounds": 4, "model": {"name": "resnet18"}, "client": client}
    cfg["strategy"] = {}
    sent = [train_config(cfg, rnd, num_classes=3) for rnd in (1, 2, 3, 4)]
    assert [s["backbone-lr-factor"] for s in sent] == [0.0, 0.0, 0.1, 0.1]
    tc = to_train_config({**sent[2], "server-round": 3}, partition_id=0)
    assert (tc.bn_mode, tc.backbone_lr_factor) == ("eval", 0.1)
    # A record from before these keys existed reads as plain fine-tuning.
    old = {k: v for k, v in sent[2].items() if k not in ("bn-mode", "backbone-lr-factor")}
    tc = to_train_config({**old, "server-round": 3}, partition_id=0)
    assert (tc.bn_mode, tc.backbone_lr_factor) == ("train", 1.0)
    with pytest.raises(FedvisionError, match="head_warmup_rounds must be >= 0"):
        train_config({**cfg, "client": {**client, "head_warmup_rounds": -1}}, 1, 3)
    with pytest.raises(FedvisionError, match=r"round 1 of 4: .*bn_mode must be one of"):
        check_every_round({**cfg, "client": {**client, "bn_mode": "frozen"}})


def test_cosine_and_step_schedules_match_hand_computed_values():
    client = {"lr": 0.1, "lr_schedule": "cosine", "lr_min_factor": 0.1}
    assert round_lr(client, 1, 5) == pytest.approx(0.1)
    assert round_lr(client, 5, 5) == pytest.approx(0.01)
    # Halfway: low + (high - low) / 2 = 0.01 + 0.045.
    assert round_lr(client, 3, 5) == pytest.approx(0.055)
    step = {"lr": 0.2, "lr_schedule": "step", "lr_step_rounds": 2, "lr_gamma": 0.5}
    assert [round_lr(step, r, 10) for r in (1, 2, 3, 5)] == pytest.approx([0.2, 0.2, 0.1, 0.05])
    with pytest.raises(FedvisionError, match="lr_schedule"):
        round_lr({"lr": 0.1, "lr_schedule": "warp"}, 1, 3)
    assert math.isclose(round_lr({"lr": 0.3, "lr_schedule": "cosine"}, 1, 1), 0.3)


def test_cosine_stays_at_its_floor_past_the_horizon():
    # A run extended beyond its schedule's horizon keeps the last lr instead of rising again.
    client = {"lr": 0.1, "lr_schedule": "cosine", "lr_min_factor": 0.1}
    assert round_lr(client, 7, 5) == pytest.approx(0.01)
    cfg = {"num_rounds": 8, "client": {**client, "lr_horizon": 4}}
    from fedvision.fl.round_config import lr_horizon

    assert lr_horizon(cfg) == 4 and lr_horizon({"num_rounds": 8, "client": client}) == 8


def test_partition_draws_are_reproducible_and_seeded_by_round():
    ids = range(10)
    a = draw_partitions(ids, 3, seed=0, server_round=4)
    assert a == draw_partitions(reversed(ids), 3, seed=0, server_round=4)
    assert len(a) == 3 and len(set(a)) == 3
    assert draw_partitions(ids, 10, 0, 1) == list(range(10))
    rounds = {tuple(draw_partitions(ids, 3, 0, r)) for r in range(1, 20)}
    assert len(rounds) > 5  # rounds draw different clients


class _Grid:
    """Nodes with random-looking ids; partition p lives on node 900 - 7 * p."""

    def __init__(self, n: int) -> None:
        self.nodes = [900 - 7 * p for p in range(n)]

    def get_node_ids(self):
        return list(self.nodes)


def _sampler(strategy, n=10, seed=0, **kw):
    grid = _Grid(n)
    sampler = SeededSampling(strategy, seed=seed, **kw)
    sampler.set_partitions({900 - 7 * p: p for p in range(n)})
    return sampler, grid


def test_seeded_sampling_lets_the_strategy_decide_how_many_and_decides_which():
    sampler, grid = _sampler(FedAvg(fraction_train=0.3, min_train_nodes=1, min_available_nodes=1))
    msgs = list(sampler.configure_train(4, ArrayRecord(), ConfigRecord({"lr": 0.1}), grid))
    pids = sorted((900 - m.metadata.dst_node_id) // 7 for m in msgs)
    assert pids == draw_partitions(range(10), 3, seed=0, server_round=4)  # int(0.3 * 10) = 3
    assert all(m.content["config"]["lr"] == 0.1 for m in msgs)
    # Node ids listed in another order: the same partitions are chosen.
    grid.nodes.reverse()
    again = list(sampler.configure_train(4, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in again) == sorted(
        m.metadata.dst_node_id for m in msgs
    )
    # min_train_nodes wins over a small fraction, as in Flower.
    sampler2, grid2 = _sampler(FedAvg(fraction_train=0.05, min_train_nodes=4))
    assert len(list(sampler2.configure_train(1, ArrayRecord(), ConfigRecord(), grid2))) == 4


def test_seeded_sampling_composes_with_flowers_dp_wrapper():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    dp = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_train=0.5, min_available_nodes=1),
        noise_multiplier=1.0,
        clipping_norm=2.5,
        num_sampled_clients=5,
    )
    sampler, grid = _sampler(dp, seed=7)
    msgs = list(sampler.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    pids = sorted((900 - m.metadata.dst_node_id) // 7 for m in msgs)
    assert pids == draw_partitions(range(10), 5, seed=7, server_round=2)
    # The DP wrapper's own part of the message survives: clients are told to clip at 2.5.
    assert all(m.content["config"]["clipping_norm"] == 2.5 for m in msgs)


def test_evaluation_draws_apart_from_training():
    sampler, grid = _sampler(FedAvg(fraction_train=0.3, fraction_evaluate=0.3))
    train = {
        m.metadata.dst_node_id
        for m in sampler.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    }
    evals = [
        {
            m.metadata.dst_node_id
            for m in sampler.configure_evaluate(r, ArrayRecord(), ConfigRecord(), grid)
        }
        for r in range(1, 6)
    ]
    assert any(e != train for e in evals)


def test_strategy_errors_are_one_line():
    cfg = {"seed": 0, "runtime": {}, "num_clients": 10}
    with pytest.raises(FedvisionError, match="cannot build strategy"):
        build_strategy({**cfg, "strategy": {"_target_": "flwr.serverapp.strategy.NoSuchStrategy"}})
    strategy = build_strategy(
        {
            **cfg,
            "strategy": {
                "_target_": "flwr.serverapp.strategy.FedProx",
                "proximal_mu": 0.5,
                "fraction_train": 0.2,
            },
        }
    )
    # One owner of the sampling settings: the Flower strategy, inside the seeded sampler.
    assert isinstance(strategy.strategy, FedProx) and strategy.strategy.proximal_mu == 0.5
    assert strategy.strategy.fraction_train == 0.2


def _eval_reply(n: int, acc: float) -> Message:
    metrics = MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_VAL_LOSS: 1.0, C.KEY_VAL_ACC: acc})
    return Message(content=RecordDict({"metrics": metrics}), dst_node_id=1, message_type="evaluate")


@pytest.mark.parametrize(("sizes", "want"), [((0, 0), None), ((0, 4), 0.5), ((2, 6), 0.25)])
def test_federated_evaluation_weights_clients_and_skips_empty_ones(sizes, want):
    accuracies = (0.0, 0.5) if sizes != (2, 6) else (1.0, 0.0)

    class Grid:
        def get_node_ids(self):
            return [11, 12]

        def push_messages(self, messages):
            self.sent = list(messages)
            for m in self.sent:
                m.metadata.__dict__["_message_id"] = m.object_id
            return [m.metadata.message_id for m in self.sent]

        def pull_messages(self, message_ids):
            return [
                Message(_eval_reply(n, a).content, reply_to=m)
                for n, a, m in zip(sizes, accuracies, self.sent, strict=True)
                if m.metadata.message_id in set(message_ids)
            ]

    strategy = SeededSampling(FedAvg(min_evaluate_nodes=1, min_available_nodes=1), seed=0)
    strategy.set_partitions({11: 0, 12: 1})
    out = federated_evaluate(Grid(), strategy, ArrayRecord(), None, ConfigRecord(), 1, 5)
    # Two clients with no validation data used to divide by a zero total weight.
    assert out["client_val_accuracy"] == (None if want is None else pytest.approx(want))
