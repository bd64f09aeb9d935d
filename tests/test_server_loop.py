"""The server's round loop against a scripted Grid: no Ray, so failures can be staged exactly."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.cache import prepare_dataset
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.fl.server import ServerPlan, build_strategy, run_federation
from fedvision.models import build_model
from fedvision.report.metrics import read_metrics


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class ScriptedGrid:
    """Two nodes; node 101 holds partition 0 and fails to train when told to."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing

    def get_node_ids(self) -> list[int]:
        return [101, 102]

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


@pytest.fixture(scope="module")
def plan_parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    root = generate_dataset(
        tmp / "gen", num_classes=3, num_source=1, train_per_class=8, val_per_class=4, size=16,
        workers=1, progress=False,
    )  # fmt: skip
    prepared = prepare_dataset(root, tmp / "cache", size=16, workers=1, progress=False)
    state = build_model("resnet18", 3).state_dict()
    return prepared.val.path, state


def _plan(plan_parts, run_dir) -> ServerPlan:
    cfg = compose_config(["num_clients=2", "num_rounds=1", "progress=false"])
    test_cache, state = plan_parts
    return ServerPlan(
        cfg=OmegaConf.to_container(cfg, resolve=True),
        run_dir=run_dir,
        num_classes=3,
        test_cache=test_cache,
        initial_state=state,
    )


def test_a_failed_client_is_counted_reported_and_left_out(plan_parts, tmp_path, capsys):
    plan = _plan(plan_parts, tmp_path)
    run_federation(ScriptedGrid({101}), build_strategy(plan.cfg["strategy"]), plan)
    record = read_metrics(tmp_path)[-1]
    assert (record["num_clients"], record["num_failures"]) == (1, 1)
    assert record["train_loss"] == pytest.approx(0.7)  # the one client that answered
    assert "1 of 2 clients failed (ValueError: boom)" in capsys.readouterr().err


def test_a_round_where_every_client_fails_stops_the_run(plan_parts, tmp_path):
    plan = _plan(plan_parts, tmp_path)
    with pytest.raises(FedvisionError, match="every client failed; first: ValueError: boom"):
        run_federation(ScriptedGrid({101, 102}), build_strategy(plan.cfg["strategy"]), plan)


def test_missing_clients_time_out_with_a_clear_error(plan_parts, tmp_path):
    plan = _plan(plan_parts, tmp_path)
    plan.cfg["runtime"]["connect_timeout_s"] = 0.5

    class OneNodeGrid(ScriptedGrid):
        def get_node_ids(self) -> list[int]:
            return [101]

    with pytest.raises(FedvisionError, match=r"only 1 of 2 clients connected within 0\.5 s"):
        run_federation(OneNodeGrid(set()), build_strategy(plan.cfg["strategy"]), plan)
