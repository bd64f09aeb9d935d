"""SCAFFOLD (Karimireddy et al. 2020, option II): engine hook, strategy and client maths by hand,
the client's c_i across rounds, the server's c across a resume, and 2-round in-process runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hydra.utils import instantiate
from test_server_loop import prepared
from torch import nn

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.engine import TrainConfig, train_local
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp
from fedvision.fl.arrays import unpack
from fedvision.fl.checkpoint import load_checkpoint, restore_strategy_state, strategy_state
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from strategies.scaffold import Controls, Scaffold, read_controls, update_controls
from tests.grids import InlineGrid

pytestmark = pytest.mark.usefixtures("task_identity")


# --- the engine hook -----------------------------------------------------------------------------


def test_one_sgd_step_moves_by_minus_lr_times_gradient_plus_correction():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.int64)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    # One step over all 6 samples (one batch), no momentum, no weight decay, no augmentation.
    cfg = TrainConfig(
        epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0, augment="none"
    )
    plain, corrected = copy.deepcopy(start), copy.deepcopy(start)
    train_local(plain, images, labels, np.arange(6), cfg, "cpu")
    corr = [torch.full((2, 48), 0.5), torch.tensor([-1.0, 2.0])]
    res = train_local(corrected, images, labels, np.arange(6), cfg, "cpu", grad_correction=corr)
    assert res.steps == 1
    for p0, p1, p2, c in zip(
        start.parameters(), plain.parameters(), corrected.parameters(), corr, strict=True
    ):
        g = (p0 - p1).detach() / 0.1  # the plain step is w0 - lr * g
        torch.testing.assert_close(p2.detach(), p0.detach() - 0.1 * (g + c))
    # The bias ends -lr * corr = -0.1 * (-1, 2) = (0.1, -0.2) away from the uncorrected one.
    torch.testing.assert_close(
        (corrected[1].bias - plain[1].bias).detach(), torch.tensor([0.1, -0.2])
    )
    with pytest.raises(ValueError, match="one per trainable parameter"):
        train_local(copy.deepcopy(start), images, labels, np.arange(6), cfg, "cpu",
                    grad_correction=corr[:1])  # fmt: skip


# --- the client's control-variate update ---------------------------------------------------------


def test_option_ii_client_update_by_hand():
    # Two packed parameters (statistics travel apart and have no control variate).
    controls = Controls(c=np.array([0.5, -0.5], np.float32), c_i=np.array([0.1, 0.2], np.float32))
    x = np.array([1.0, 2.0], np.float32)
    y = np.array([0.8, 2.3], np.float32)
    # K = 4 steps at lr 0.1, plain SGD: (x - y) / (K lr) = (0.2, -0.3) / 0.4 = (0.5, -0.75);
    # c_i+ = c_i - c + that = (0.1 - 0.5 + 0.5, 0.2 + 0.5 - 0.75) = (0.1, -0.05).
    new, delta = update_controls(controls, x, y, steps=4, lr=0.1, momentum=0.0)
    np.testing.assert_allclose(new, [0.1, -0.05], atol=1e-6)
    np.testing.assert_allclose(delta, [0.0, -0.25], atol=1e-6)
    # K = 2 steps with momentum 0.5 count as a = 1 + 1.5 = 2.5 steps: (0.2, -0.3) / 0.25 =
    # (0.8, -1.2); c_i+ = (0.1 - 0.5 + 0.8, 0.2 + 0.5 - 1.2) = (0.4, -0.5).
    new, _ = update_controls(controls, x, y, steps=2, lr=0.1, momentum=0.5)
    np.testing.assert_allclose(new, [0.4, -0.5], atol=1e-6)


# --- the strategy --------------------------------------------------------------------------------


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


def _record(w) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})


def _reply(y, dc, n: int) -> Message:
    metrics = MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_TRAIN_LOSS: 0.5})
    content = RecordDict(
        {C.KEY_ARRAYS: _record(y), C.KEY_CONTROL_DELTA: _record(dc), C.KEY_METRICS: metrics}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def _strategy(*overrides: str) -> Scaffold:
    cfg = compose_config(["strategy=scaffold", "num_clients=4", *overrides])
    strategy = instantiate(cfg.strategy)
    assert type(strategy) is Scaffold and strategy.num_clients == 4
    return strategy


def test_scaffold_server_step_by_hand():
    strategy = _strategy()
    messages = list(strategy.configure_train(1, _record([1, 2]), ConfigRecord(), _Grid()))
    assert len(messages) == 10
    for m in messages:  # every train message carries c, zeros in round 1
        np.testing.assert_array_equal(m.content[C.KEY_CONTROL]["w"].numpy(), [0.0, 0.0])
    strategy.control = _record([0.5, -0.5])  # a c from earlier rounds
    # x = (1, 2); two of N = 4 clients reply: y1 = (0, 3) with 1 example, y2 = (1, 5) with 3.
    # x_new = x + 1.0 * mean(y - x) = mean(y) = (0.5, 4) (unweighted; weighted: (0.75, 4.5)).
    # dc1 = (0.2, -0.4), dc2 = (0.6, 0): mean (0.4, -0.2); c_new = c + 2/4 * mean
    #       = (0.5 + 0.2, -0.5 - 0.1) = (0.7, -0.6).
    replies = [_reply([0, 3], [0.2, -0.4], 1), _reply([1, 5], [0.6, 0.0], 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5, 4.0], rtol=1e-6)
    np.testing.assert_allclose(strategy.control["w"].numpy(), [0.7, -0.6], rtol=1e-6)
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(0.5)
    # global_lr = 0.5: x + 0.5 * ((0.5, 4) - (1, 2)) = (0.75, 3).
    strategy = _strategy("strategy.global_lr=0.5")
    list(strategy.configure_train(1, _record([1, 2]), ConfigRecord(), _Grid()))
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.75, 3.0], rtol=1e-6)


def test_a_cohorts_reply_counts_as_the_clients_behind_its_mean():
    strategy = _strategy()
    list(strategy.configure_train(1, _record([1, 2]), ConfigRecord(), _Grid()))
    strategy.control = _record([0.5, -0.5])
    # A cohort of 2 clients (mean y (0, 3), mean dc (0.2, -0.4)) and one client (1, 5), (0.6, 0).
    # x_new = (2 * (0, 3) + (1, 5)) / 3 = (1/3, 11/3); 3 of N = 4 replied:
    # c_new = c + 3/4 * (2 * (0.2, -0.4) + (0.6, 0)) / 3 = (0.5 + 0.25, -0.5 - 0.2) = (0.75, -0.7).
    cohort = _reply([0, 3], [0.2, -0.4], 10)
    cohort.content[C.KEY_METRICS][C.KEY_COHORT_CLIENTS] = 2
    arrays, _ = strategy.aggregate_train(1, [cohort, _reply([1, 5], [0.6, 0.0], 3)])
    np.testing.assert_allclose(arrays["w"].numpy(), [1 / 3, 11 / 3], rtol=1e-6)
    np.testing.assert_allclose(strategy.control["w"].numpy(), [0.75, -0.7], rtol=1e-6)
    # More clients behind the replies than the federation has: a config mistake, one line.
    cohort.content[C.KEY_METRICS][C.KEY_COHORT_CLIENTS] = 4
    with pytest.raises(FedvisionError, match=r"5 clients replied but strategy\.num_clients=4"):
        strategy.aggregate_train(1, [cohort, _reply([1, 5], [0.6, 0.0], 3)])


def test_the_control_variate_goes_through_a_checkpoint(tmp_path):
    from fedvision.fl.checkpoint import Checkpoint, save_checkpoint

    strategy = _strategy()
    list(strategy.configure_train(1, _record([1, 2]), ConfigRecord(), _Grid()))
    strategy.aggregate_train(1, [_reply([0, 3], [0.2, -0.4], 1), _reply([1, 5], [0.6, 0.0], 3)])
    ckpt = Checkpoint(
        model={"w": torch.zeros(2)}, arch="x", num_classes=2, round=1, lr_horizon=2,
        strategy=strategy_state(strategy),
    )  # fmt: skip
    save_checkpoint(tmp_path / "c.pt", ckpt)
    fresh = _strategy()
    restore_strategy_state(
        fresh, load_checkpoint(tmp_path / "c.pt", arch="x", num_classes=2).strategy
    )
    # c = 0 + 2/4 * (0.4, -0.2) = (0.2, -0.1), and the next round sends it.
    np.testing.assert_allclose(fresh.control["w"].numpy(), [0.2, -0.1], rtol=1e-6)
    message = next(iter(fresh.configure_train(2, _record([1, 2]), ConfigRecord(), _Grid())))
    np.testing.assert_allclose(message.content[C.KEY_CONTROL]["w"].numpy(), [0.2, -0.1], rtol=1e-6)
    with pytest.raises(FedvisionError, match="does not fit the model"):
        fresh.configure_train(3, _record([1, 2, 3]), ConfigRecord(), _Grid())


def test_a_reply_without_its_control_update_is_refused_with_one_line():
    strategy = _strategy()
    list(strategy.configure_train(1, _record([1, 2]), ConfigRecord(), _Grid()))
    bad = _reply([0, 3], [0.2, -0.4], 1)
    del bad.content[C.KEY_CONTROL_DELTA]
    with pytest.raises(FedvisionError, match="lacks the array record 'scaffold-dc'"):
        strategy.aggregate_train(1, [bad])


# --- in-process runs with the real ClientApp -----------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("scaffold") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


class StateGrid(InlineGrid):
    """InlineGrid that also keeps each node's c_i after each of its train exchanges."""

    def __init__(self, run_dir, num_nodes: int) -> None:
        super().__init__(run_dir, num_nodes)
        self.states: list[tuple[Message, Message, np.ndarray]] = []

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            replies += super().send_and_receive([m], timeout)
            own = self.contexts[m.metadata.dst_node_id].state.get(C.STATE_CONTROL)
            if m.metadata.message_type == "train":
                self.states.append((m, replies[-1], own[C.KEY_FLAT].numpy().copy()))
        return replies


SGD = ["client.momentum=0", "client.weight_decay=0", "client.augment=none",
       "client.lr_schedule=constant", "client.lr=0.05", "client.batch_size=4"]  # fmt: skip
K, LR = 2, 0.05


def _flat(record: ArrayRecord) -> np.ndarray:
    return record[C.KEY_FLAT].numpy().astype(np.float64)


def _shared(finetune: str, local_bn: bool) -> tuple[list[str], list[str]]:
    """The packed parameters of the run's model, and its travelling BatchNorm statistics."""
    from fedvision.models import build_model, split_parts

    model = build_model("resnet18", 2, finetune=finetune, last_k=1)
    parts = split_parts(model, local_bn=local_bn)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(parts.shared) <= params  # every packed entry gets a control variate
    return list(parts.shared), list(parts.stats)


@pytest.mark.parametrize(
    "extra",
    [[], ["model.finetune=last_k", "model.last_k=1", "client.local_bn=true",
          "strategy.fraction_evaluate=1.0", "strategy.min_evaluate_nodes=1",
          "partition.val_fraction=0.3"]],
    ids=["full", "last_k+fedbn"],
)  # fmt: skip
def test_two_rounds_follow_option_ii_and_c_i_persists_in_the_context(dataset, tmp_path, extra):
    run_dir = prepared(
        dataset, tmp_path, "strategy=scaffold", "num_rounds=2", f"client.local_steps={K}", *SGD,
        *extra,
    )  # fmt: skip
    grid = StateGrid(run_dir, 2)
    summary = serve(grid, run_dir)
    assert summary["rounds_done"] == 2
    finetune = "last_k" if extra else "full"
    shared, stats = _shared(finetune, local_bn=bool(extra))
    size = sum(t.numel() for k, t in torch.load(run_dir / C.RUN_INITIAL).items() if k in shared)
    r1 = [s for s in grid.states if s[0].content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == 1]
    r2 = [s for s in grid.states if s[0].content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == 2]
    assert len(r1) == len(r2) == 2
    # Round 1: c = 0 and c_i = 0, so c_i+ = (x - y_i) / (K lr) on parameters, 0 elsewhere.
    for m, reply, own in r1:
        assert reply.content[C.KEY_METRICS][C.KEY_STEPS] == K
        assert not _flat(m.content[C.KEY_CONTROL]).any()
        assert _flat(m.content[C.KEY_CONTROL]).size == size  # c: the parameters' layout
        x, y = _flat(m.content[C.KEY_ARRAYS]), _flat(reply.content[C.KEY_ARRAYS])
        want = (x - y) / (K * LR)
        np.testing.assert_allclose(own, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_flat(reply.content[C.KEY_CONTROL_DELTA]), own, atol=1e-6)
        assert np.abs(own).max() > 0
    # Server, N = 2 clients, both replied: x2 = unweighted mean of y, c2 = 0 + 2/2 * mean(dc).
    x2 = np.mean([_flat(r.content[C.KEY_ARRAYS]) for _, r, _ in r1], axis=0)
    c2 = np.mean([own for _, _, own in r1], axis=0)
    # Round 2: each node continues from its own c_i (from the Context, not zeros).
    first = {m.metadata.dst_node_id: own for m, _, own in r1}
    for m, reply, own in r2:
        np.testing.assert_allclose(_flat(m.content[C.KEY_ARRAYS]), x2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_flat(m.content[C.KEY_CONTROL]), c2, rtol=1e-5, atol=1e-7)
        c_i = first[m.metadata.dst_node_id]
        y = _flat(reply.content[C.KEY_ARRAYS])
        want = c_i - c2 + (_flat(m.content[C.KEY_ARRAYS]) - y) / (K * LR)
        np.testing.assert_allclose(own, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            _flat(reply.content[C.KEY_CONTROL_DELTA]), own - c_i, rtol=1e-4, atol=1e-5
        )
    # The checkpoint keeps c3 = c2 + mean(round-2 updates).
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)
    c3 = latest["strategy"]["1.control"]["value"][C.KEY_FLAT].numpy()
    dc2 = np.mean([_flat(r.content[C.KEY_CONTROL_DELTA]) for _, r, _ in r2], axis=0)
    np.testing.assert_allclose(c3, c2 + dc2, rtol=1e-5, atol=1e-7)
    assert read_metrics(run_dir)[-1]["num_clients"] == 2
    if extra:
        return
    # Replaying client 0's round 2 with g + c - c_i (mapped onto the parameters by name)
    # reproduces its reply exactly; without the correction it does not.
    from fedvision.fl.round_config import to_train_config
    from fedvision.models import build_model

    m, reply, _ = next(s for s in r2 if s[0].metadata.dst_node_id == 1000)
    ctx = grid.contexts[1000]
    cache, train_idx, _ = clientapp.client_indices(clientapp.node_settings(ctx))
    cfg = to_train_config(m.content[C.KEY_CONFIG], 0)
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    layout = {k: tuple(initial[k].shape) for k in shared}
    diff = ArrayRecord({C.KEY_FLAT: Array((c2 - first[1000]).astype(np.float32))})
    by_name = unpack(diff, layout).to_torch_state_dict()
    outcome = {}
    for use in (True, False):
        replica = build_model("resnet18", 2)
        received = unpack(m.content[C.KEY_ARRAYS], layout).to_torch_state_dict()
        stat_layout = {k: tuple(initial[k].shape) for k in stats}
        received.update(unpack(m.content[C.KEY_BN_STATS], stat_layout).to_torch_state_dict())
        replica.load_state_dict(received, strict=False)  # counters: never sent, never read
        corr = [by_name[n] for n, p in replica.named_parameters() if p.requires_grad]
        train_local(replica, cache.images, cache.labels, train_idx, cfg, "cpu",
                    grad_correction=corr if use else None)  # fmt: skip
        got = np.concatenate([replica.state_dict()[k].numpy().reshape(-1) for k in shared])
        sent = reply.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
        outcome[use] = np.array_equal(got.astype(np.float32), sent)
    assert outcome == {True: True, False: False}


def test_the_servers_control_variate_survives_a_resume(dataset, tmp_path):
    from fedvision.rundir import append_resume

    run_dir = prepared(
        dataset, tmp_path, "strategy=scaffold", "num_rounds=1", f"client.local_steps={K}", *SGD
    )
    first = StateGrid(run_dir, 2)
    serve(first, run_dir)
    c_saved = load_checkpoint(run_dir / C.CKPT_LATEST, arch="resnet18", num_classes=2).strategy
    c_saved = c_saved["1.control"]["value"][C.KEY_FLAT].numpy()
    # N = 2, both replied: c = mean of the round-1 updates, and it is no zero vector.
    np.testing.assert_allclose(
        c_saved, np.mean([own for _, _, own in first.states], axis=0), rtol=1e-5, atol=1e-7
    )
    assert np.abs(c_saved).max() > 0
    append_resume(run_dir, 1, {"num_rounds": (1, 2)})  # what `resume=... num_rounds=2` records
    again = StateGrid(run_dir, 2)  # a resumed run is a new Flower run: fresh Contexts
    serve(again, run_dir)
    for m, _, _ in again.states:
        assert m.content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == 2
        np.testing.assert_array_equal(m.content[C.KEY_CONTROL][C.KEY_FLAT].numpy(), c_saved)


def test_a_client_with_another_optimiser_refuses_scaffold():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    c = ArrayRecord({C.KEY_FLAT: Array(np.zeros(3, np.float32))})
    msg = Message(content=RecordDict({C.KEY_CONTROL: c}), dst_node_id=1, message_type="train")
    with pytest.raises(FedvisionError, match="needs local SGD"):
        read_controls(msg, ctx, nn.Linear(1, 1), (), "adam")
