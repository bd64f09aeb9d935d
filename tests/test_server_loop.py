"""The server's round loop against scripted Grids: no Ray, so failures can be staged exactly."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.runner import run_experiment


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("loop") / "gen", num_classes=3, num_source=1, train_per_class=12,
        val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


def prepared(dataset, run_dir, *extra: str):
    """A run directory prepared by `fedvision run ... runtime=prepare_only` (no runtime starts)."""
    cfg = compose_config(
        [
            f"data.root={dataset}",
            f"data.classes_file={dataset / 'target_classes.txt'}",
            "data.size=16",
            "data.workers=1",
            "num_clients=2",
            "num_rounds=1",
            "partition=iid",
            "progress=false",
            "runtime=prepare_only",
            "runtime.connect_timeout_s=0.5",
            *extra,
        ]
    )
    assert run_experiment(cfg, run_dir) == {"prepared": str(run_dir)}
    return run_dir


class ScriptedGrid:
    """Two nodes; node 101 holds partition 0. Nodes in ``failing`` fail to train."""

    def __init__(self, failing: set[int] = frozenset(), nodes: tuple[int, ...] = (101, 102)):
        self.failing = failing
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "query":
                metrics = MetricRecord({C.KEY_PARTITION_ID: node - 101})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=m))
            elif node in self.failing:
                replies.append(Message(Error(code=1, reason="ValueError: boom"), reply_to=m))
            else:
                metrics = MetricRecord({C.KEY_NUM_EXAMPLES: 5, C.KEY_TRAIN_LOSS: 0.7})
                content = RecordDict({"arrays": m.content["arrays"], "metrics": metrics})
                replies.append(Message(content, reply_to=m))
        return replies


class InlineGrid:
    """Runs fedvision's real ClientApp in this process, one Context per node, like a runtime."""

    def __init__(self, run_dir, num_nodes: int) -> None:
        self.contexts = {
            1000 + p: Context(
                run_id=1,
                node_id=1000 + p,
                node_config={C.KEY_PARTITION_ID: p, C.KEY_NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={C.RUN_DIR_KEY: str(run_dir)},
            )
            for p in range(num_nodes)
        }
        self.sent: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [clientapp.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def test_a_failed_client_is_counted_reported_and_left_out(dataset, tmp_path, capsys):
    serve(ScriptedGrid({101}), prepared(dataset, tmp_path))
    record = read_metrics(tmp_path)[-1]
    assert (record["num_clients"], record["num_failures"]) == (1, 1)
    assert record["train_loss"] == pytest.approx(0.7)  # the one client that answered
    assert "1 of 2 clients failed (ValueError: boom)" in capsys.readouterr().err
    assert json.loads((tmp_path / C.RUN_STATUS).read_text())["status"] == "finished"


def test_a_round_where_every_client_fails_stops_the_run_and_says_why(dataset, tmp_path):
    run_dir = prepared(dataset, tmp_path)
    with pytest.raises(FedvisionError, match="every client failed; first: ValueError: boom"):
        serve(ScriptedGrid({101, 102}), run_dir)
    status = json.loads((run_dir / C.RUN_STATUS).read_text())
    assert status["status"] == "failed" and status["user_error"]
    assert "every client failed" in status["error"]


def test_missing_clients_time_out_with_a_clear_error(dataset, tmp_path):
    with pytest.raises(FedvisionError, match=r"only 1 of 2 clients connected within 0\.5 s"):
        serve(ScriptedGrid(nodes=(101,)), prepared(dataset, tmp_path))


def test_a_round_that_loses_its_clients_fails_instead_of_waiting_forever(dataset, tmp_path):
    class VanishingGrid(ScriptedGrid):
        """Both nodes answer discovery, then one disappears before round 1."""

        def send_and_receive(self, messages, timeout):
            replies = super().send_and_receive(messages, timeout)
            self.nodes = [101]
            return replies

    run_dir = prepared(dataset, tmp_path, "strategy.min_available_nodes=2")
    with pytest.raises(FedvisionError, match=r"needs 2 clients but only 1 .* after 0\.5 s"):
        serve(VanishingGrid(), run_dir)


def test_the_real_client_app_trains_in_process_and_reads_its_device_from_the_plan(
    dataset, tmp_path
):
    run_dir = prepared(dataset, tmp_path, "client.local_steps=1", "client.batch_size=4")
    grid = InlineGrid(run_dir, 2)
    summary = serve(grid, run_dir)
    assert summary["rounds_done"] == 1 and summary["selection"] == "val_accuracy"
    assert sorted(grid.sent[2:]) == [1000, 1001]  # after the two discovery queries
    node = clientapp.node_settings(grid.contexts[1000])
    plan = json.loads((run_dir / C.RUN_PLAN).read_text())
    assert node[C.NODE_DEVICE] == plan["client_device"] == "auto"  # prepare_only's choice
    assert node[C.NODE_CACHE_DIR] == plan["train_cache"]
    # A SuperNode's own node config wins over the run directory's plan.
    ctx = grid.contexts[1001]
    ctx.node_config[C.NODE_DEVICE] = "cuda:3"
    assert clientapp.node_settings(ctx)[C.NODE_DEVICE] == "cuda:3"


def test_a_client_without_data_or_run_dir_says_how_to_start_it():
    ctx = Context(
        run_id=1, node_id=5, node_config={C.KEY_PARTITION_ID: 0}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    with pytest.raises(FedvisionError, match="--node-config"):
        clientapp.node_settings(ctx)


def test_best_checkpoint_follows_validation_and_latest_holds_the_strategy_state(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, "num_rounds=2", "strategy=fedavgm", "client.local_steps=1",
        "client.batch_size=4",
    )  # fmt: skip
    summary = serve(InlineGrid(run_dir, 2), run_dir)
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)
    best = torch.load(run_dir / C.CKPT_BEST, weights_only=True)
    assert latest["round"] == 2 and best["round"] == summary["best_round"]
    assert latest["best_round"] == summary["best_round"]
    assert "1.momentum_vector" in latest["strategy"]  # FedAvgM's momentum buffer
    assert all(t.dtype == torch.float32 for t in latest["model"].values())
    # A run's checkpoint is a model checkpoint too (shapes kept: BatchNorm's counter stays 0-d).
    from fedvision.models import build_model

    reference = build_model("resnet18", 2).state_dict()
    assert {k: t.shape for k, t in latest["model"].items()} == {
        k: t.shape for k, t in reference.items()
    }
    build_model("resnet18", 2, weights=str(run_dir / C.CKPT_BEST))


def test_extending_a_run_keeps_its_schedule_and_records_the_change(dataset, tmp_path):
    from fedvision.rundir import append_resume, load_run_config

    run_dir = prepared(
        dataset, tmp_path, "num_rounds=2", "client.local_steps=1", "client.batch_size=4",
        "client.lr=0.1", "client.lr_schedule=cosine", "client.lr_min_factor=0.1",
    )  # fmt: skip
    serve(InlineGrid(run_dir, 2), run_dir)
    config_before = (run_dir / C.RUN_CONFIG).read_text()
    append_resume(run_dir, 2, {"num_rounds": (2, 3)})  # what `resume=... num_rounds=3` records
    serve(InlineGrid(run_dir, 2), run_dir)
    lrs = [r["lr"] for r in read_metrics(run_dir)[1:]]
    # The horizon stays 2 rounds: 0.1, then the floor 0.01, and round 3 stays at the floor (a
    # schedule recomputed over 3 rounds would have given round 2 lr 0.055).
    assert lrs == pytest.approx([0.1, 0.01, 0.01])
    assert (run_dir / C.RUN_CONFIG).read_text() == config_before
    assert load_run_config(run_dir)["num_rounds"] == 3
    assert torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["round"] == 3
