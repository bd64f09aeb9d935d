"""Federated maths of the server side, checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.fl.round_config import round_lr, to_train_config, train_config
from fedvision.fl.server import _federated_evaluate, _NodesView, build_strategy, sample_clients


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the running task's identity; outside a run there is none."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


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


def test_client_sampling_is_reproducible_and_honours_the_minimum():
    ids = range(10)
    a = sample_clients(ids, 0.3, 2, seed=0, server_round=4)
    assert a == sample_clients(reversed(ids), 0.3, 2, seed=0, server_round=4)
    assert len(a) == 3 and len(set(a)) == 3
    assert len(sample_clients(ids, 0.05, 4, seed=0, server_round=1)) == 4  # minimum wins
    assert sample_clients(ids, 1.0, 2, 0, 1) == list(range(10))
    rounds = {tuple(sample_clients(ids, 0.3, 1, 0, r)) for r in range(1, 20)}
    assert len(rounds) > 5  # rounds draw different clients


def test_nodes_view_hides_unsampled_nodes_from_the_strategy():
    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4]

    view = _NodesView(Grid(), [2, 4])
    msgs = FedAvg(min_train_nodes=1, min_available_nodes=1).configure_train(
        1, ArrayRecord(), ConfigRecord(), view
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == [2, 4]


def test_strategy_errors_are_one_line():
    with pytest.raises(FedvisionError, match="cannot build strategy"):
        build_strategy({"_target_": "flwr.serverapp.strategy.NoSuchStrategy"})
    strategy = build_strategy(
        {"_target_": "flwr.serverapp.strategy.FedProx", "proximal_mu": 0.5, "fraction_train": 0.2}
    )
    assert isinstance(strategy, FedProx) and strategy.proximal_mu == 0.5
    assert strategy.fraction_train == 1.0  # sampling is fedvision's, not the strategy's


def _eval_reply(n: int, acc: float) -> Message:
    metrics = MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_VAL_LOSS: 1.0, C.KEY_VAL_ACC: acc})
    return Message(content=RecordDict({"metrics": metrics}), dst_node_id=1, message_type="evaluate")


@pytest.mark.parametrize(("sizes", "want"), [((0, 0), None), ((0, 4), 0.5), ((2, 6), 0.25)])
def test_federated_evaluation_weights_clients_and_skips_empty_ones(sizes, want):
    accuracies = (0.0, 0.5) if sizes != (2, 6) else (1.0, 0.0)

    class Grid:
        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, timeout):
            return [_eval_reply(n, a) for n, a in zip(sizes, accuracies, strict=True)]

    cfg = {"seed": 0, "strategy": {"fraction_evaluate": 1.0, "min_evaluate_nodes": 1}}
    strategy = FedAvg(min_evaluate_nodes=1, min_available_nodes=1)
    out = _federated_evaluate(
        Grid(), strategy, ArrayRecord(), ConfigRecord(), cfg, 1, {0: 11, 1: 12}, 5
    )
    # Two clients with no validation data used to divide by a zero total weight.
    assert out["val_accuracy"] == (None if want is None else pytest.approx(want))
