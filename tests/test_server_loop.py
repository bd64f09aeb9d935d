"""The server's round loop against scripted Grids: no Ray, so failures can be staged exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp
from fedvision.fl.arrays import unpack
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.runner import run_experiment
from tests.grids import InlineGrid, ScriptedGrid

pytestmark = pytest.mark.usefixtures("task_identity")


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
            "model=resnet18",
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


# --- partial messages (finetune=head/last_k) and FedBN --------------------------------------------

NPY_HEADER = 128  # np.save's header for these shapes: Flower counts it in ArrayRecord.count_bytes


def _message_bytes(state: dict[str, torch.Tensor], keys) -> int:
    """What the packed float32 ArrayRecord of ``keys`` weighs as Flower counts it."""
    return NPY_HEADER + 4 * sum(state[k].numel() for k in keys) + len(C.KEY_FLAT)


def _unpacked(msg, state: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """The arrays of a message, cut out of its one packed array (raises if the sizes differ)."""
    packed = msg.content[C.KEY_ARRAYS]
    assert list(packed.keys()) == [C.KEY_FLAT]  # one array travels, whatever the model
    return unpack(packed, {k: tuple(state[k].shape) for k in keys}).to_torch_state_dict()


def _pretrained(path, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """A stand-in for a pretrained checkpoint: other weights, non-trivial BatchNorm statistics."""
    from fedvision.models import build_model

    torch.manual_seed(123)
    state = build_model("resnet18", num_classes).state_dict()
    for k, t in state.items():
        if k.endswith("running_mean"):
            t.normal_()
        elif k.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif k.endswith("num_batches_tracked"):
            t.fill_(1000)
    torch.save(state, path)
    return state


def _stats_both_ways(grid: InlineGrid) -> list[tuple[ArrayRecord | None, ArrayRecord | None]]:
    """The BatchNorm statistics of each train message and of its reply as the client sent it."""
    return [
        (m.content.array_records.get(C.KEY_BN_STATS), sent.get(C.KEY_BN_STATS))
        for (m, _, _), sent in zip(grid.log, grid.replied, strict=True)
        if m.metadata.message_type == "train"
    ]


def _train_exchanges(grid: InlineGrid, rnd: int | None = None):
    return [
        (m, r, own)
        for m, r, own in grid.log
        if m.metadata.message_type == "train"
        and (rnd is None or m.content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == rnd)
    ]


# resnet18 with 2 classes. head: fc (2 x 512 + 2). last_k=1: layer4's convs (3x3 256->512,
# three 3x3 512->512, the 1x1 256->512 shortcut), its 5 BatchNorm layers (weight and bias of 512
# each as parameters; running mean and var of 512 each as statistics, which travel beside them
# because the layers train; a counter each, never sent) and fc.
# (prefixes, parameter floats, parameter arrays, statistics floats, statistics arrays, counters)
LAYER4_CONVS = 512 * 256 * 9 + 3 * 512 * 512 * 9 + 512 * 256
HAND = {
    "head": (("fc.",), 2 * 512 + 2, 2, 0, 0, 0),
    "last_k": (
        ("layer4.", "fc."),
        LAYER4_CONVS + 5 * 2 * 512 + 2 * 512 + 2,
        5 + 10 + 2,
        5 * 2 * 512,
        10,
        5,
    ),
}


@pytest.mark.parametrize("finetune", ["head", "last_k"])
def test_a_frozen_backbone_is_never_sent_and_stays_bit_identical(dataset, tmp_path, finetune):
    ckpt = tmp_path / "pretrained.pt"
    pretrained = _pretrained(ckpt)
    run_dir = prepared(
        dataset, tmp_path / "run", "num_rounds=3", f"model.finetune={finetune}", "model.last_k=1",
        f"model.weights={ckpt}", "client.local_steps=2", "client.batch_size=4",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    prefixes, floats, num_arrays, stat_floats, num_stats, num_counters = HAND[finetune]
    assert LAYER4_CONVS == 8_388_608
    trained = [k for k in pretrained if k.startswith(prefixes)]
    counters = [k for k in trained if k.endswith("num_batches_tracked")]
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    sent = [k for k in trained if k not in counters + stats]
    assert (len(sent), len(stats), len(counters)) == (num_arrays, num_stats, num_counters)
    assert sum(pretrained[k].numel() for k in sent) == floats  # the hand count above
    assert sum(pretrained[k].numel() for k in stats) == stat_floats
    frozen = [k for k in pretrained if k not in trained]

    # Both directions carry exactly the trained parameters (and statistics), every round.
    exchanges = _train_exchanges(grid)
    assert len(exchanges) == 3 * 2
    for (m, reply, _), both in zip(exchanges, _stats_both_ways(grid), strict=True):
        for msg in (m, reply):
            assert msg.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy().size == floats
            assert list(_unpacked(msg, pretrained, sent)) == sent
        for got in both:
            assert (0 if got is None else got[C.KEY_FLAT].numpy().size) == stat_floats
    per_client = _message_bytes(pretrained, sent) + (
        _message_bytes(pretrained, stats) if stats else 0
    )
    for r in read_metrics(run_dir)[1:]:
        assert r["bytes_down"] == r["bytes_up"] == 2 * per_client

    # The server's global model and a client's trained model keep the pretrained backbone.
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    client_model = clientapp._model("resnet18", 2, finetune, 1, "cpu").state_dict()
    for k in frozen:
        assert torch.equal(initial[k], pretrained[k]), k
        assert torch.equal(latest[k].to(initial[k].dtype), initial[k]), k
        assert torch.equal(client_model[k], initial[k]), k
    assert not torch.equal(latest["fc.weight"], initial["fc.weight"])  # the head did train
    # The checkpoint is the whole model: central evaluation and checkpoints see everything.
    assert list(latest) == list(pretrained)


def test_full_finetuning_sends_every_parameter_and_statistic_but_no_counter(dataset, tmp_path):
    run_dir = prepared(dataset, tmp_path, "client.local_steps=1", "client.batch_size=4")
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    params = [k for k in initial if not k.endswith(("running_mean", "running_var", "tracked"))]
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    for (m, reply, _), both in zip(_train_exchanges(grid), _stats_both_ways(grid), strict=True):
        for msg in (m, reply):
            assert list(_unpacked(msg, initial, params)) == params
        for got in both:
            assert got[C.KEY_FLAT].numpy().size == sum(initial[k].numel() for k in stats)
        assert m.content[C.KEY_CONFIG][C.KEY_BASE_FINGERPRINT] == ""  # no base needed
    record = read_metrics(run_dir)[1]
    per_client = _message_bytes(initial, params) + _message_bytes(initial, stats)
    assert record["bytes_down"] == record["bytes_up"] == 2 * per_client
    # How far each client moved, from what it was sent and what it sent back (FedAvg leaves the
    # replies as they came; no clipping norm, so no clipped fraction).
    norms = [
        np.linalg.norm(
            r.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy().astype(np.float64)
            - m.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
        )
        for m, r, _ in _train_exchanges(grid, 1)
    ]
    assert len(norms) == 2 and min(norms) > 0
    assert record["update_norm_median"] == pytest.approx(float(np.median(norms)))
    assert record["update_norm_max"] == pytest.approx(max(norms))
    assert "clipped_fraction" not in record


def test_batchnorm_in_eval_mode_sends_no_statistics_and_keeps_the_bases(dataset, tmp_path):
    ckpt = tmp_path / "pretrained.pt"
    pretrained = _pretrained(ckpt)
    run_dir = prepared(
        dataset, tmp_path / "run", "num_rounds=2", f"model.weights={ckpt}",
        "client.bn_mode=eval", "client.local_steps=2", "client.batch_size=4",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    stats = [k for k in pretrained if k.endswith(("running_mean", "running_var"))]
    params = [k for k in pretrained if k not in stats and not k.endswith("tracked")]
    # Statistics never move in eval mode, so they are frozen entries: neither direction sends
    # them, and the client checks its base holds the same ones (a fingerprint is sent).
    for m, reply, _ in _train_exchanges(grid):
        for msg in (m, reply):
            assert C.KEY_BN_STATS not in msg.content.array_records
            assert list(_unpacked(msg, pretrained, params)) == params
        assert m.content[C.KEY_CONFIG][C.KEY_BASE_FINGERPRINT] != ""
    record = read_metrics(run_dir)[1]
    assert record["bytes_down"] == record["bytes_up"] == 2 * _message_bytes(pretrained, params)
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    for k in stats:
        assert torch.equal(latest[k].to(pretrained[k].dtype), pretrained[k]), k
    assert not torch.equal(latest["fc.weight"], pretrained["fc.weight"])


def test_a_client_with_another_base_fails_with_one_clear_line(dataset, tmp_path):
    run_dir = prepared(dataset, tmp_path / "run", "model.finetune=head")
    other = tmp_path / "other.pt"
    _pretrained(other)
    grid = InlineGrid(run_dir, 2)
    for ctx in grid.contexts.values():
        ctx.node_config[C.NODE_INITIAL_WEIGHTS] = str(other)
    with pytest.raises(FedvisionError, match=r"do not match the server's") as info:
        serve(grid, run_dir)
    assert "\n" not in str(info.value) and "initial_weights.pt" in str(info.value)
    # Without any base, the client says how to give it one.
    for ctx in grid.contexts.values():
        ctx.node_config[C.NODE_INITIAL_WEIGHTS] = str(tmp_path / "missing.pt")
    with pytest.raises(FedvisionError, match=r"--node-config \"initial-weights="):
        serve(grid, run_dir)


@pytest.mark.parametrize(
    ("strategy", "finetune"), [("fedavg", "full"), ("fedprox", "full"), ("fedavg", "last_k")]
)
def test_fedbn_keeps_each_clients_batchnorm_and_averages_the_rest(
    dataset, tmp_path, strategy, finetune
):
    from fedvision.engine import train_local
    from fedvision.fl.round_config import to_train_config
    from fedvision.models import batchnorm_keys, build_model, split_parts

    run_dir = prepared(
        dataset, tmp_path, "num_clients=3", "num_rounds=2", f"strategy={strategy}",
        "client.local_bn=true", "strategy.fraction_evaluate=1.0", "strategy.min_evaluate_nodes=1",
        "partition.val_fraction=0.3", f"model.finetune={finetune}", "model.last_k=1",
        "client.local_steps=1", "client.batch_size=4", "client.augment=none",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 3)
    summary = serve(grid, run_dir)
    model = build_model("resnet18", 2, finetune=finetune, last_k=1)
    parts = split_parts(model, local_bn=True)
    bn = set(batchnorm_keys(model))
    assert parts.shared and parts.local and set(parts.local) <= bn

    # No BatchNorm entry travels, in either direction, in training or evaluation.
    kinds = [m.metadata.message_type for m, _, _ in grid.log]
    assert kinds.count("train") == kinds.count("evaluate") == 2 * 3
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    shared_floats = sum(initial[k].numel() for k in parts.shared)
    for m, reply, _ in grid.log:
        for msg in (m, reply):
            for record in msg.content.array_records.values():  # exactly the shared floats
                assert list(record.keys()) == [C.KEY_FLAT]
                assert record[C.KEY_FLAT].numpy().size == shared_floats
        if m.metadata.message_type == "train" and strategy == "fedprox":
            assert m.content[C.KEY_CONFIG][C.KEY_PROXIMAL_MU] == pytest.approx(0.01)

    # The global shared weights are the example-weighted mean of round 2's replies; everything
    # that is not shared (BatchNorm, a frozen backbone) is still the initial model.
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    last = _train_exchanges(grid, 2)
    sizes = [int(r.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES]) for _, r, _ in last]
    for k in parts.shared:
        mean = sum(
            n * _unpacked(r, initial, parts.shared)[k].numpy().astype("float64")
            for n, (_, r, _) in zip(sizes, last, strict=True)
        ) / sum(sizes)
        torch.testing.assert_close(latest[k], torch.from_numpy(mean).float(), rtol=1e-5, atol=1e-6)
    for k in parts.unsent:
        assert torch.equal(latest[k].to(initial[k].dtype), initial[k]), k

    # Each client's BatchNorm continues from its own round-1 state: one step a round moves the
    # counters 0 -> 1 -> 2, and replaying round 2 from the client's own round-1 BatchNorm gives
    # its stored statistics exactly (from the initial ones it would not).
    counters = [k for k in parts.local if k.endswith("num_batches_tracked")]
    first = {m.metadata.dst_node_id: own for m, _, own in _train_exchanges(grid, 1)}
    for m, _, own in last:
        node = m.metadata.dst_node_id
        assert all(int(first[node][k]) == 1 and int(own[k]) == 2 for k in counters)
        ctx = grid.contexts[node]
        cache, train_idx, _ = clientapp.client_indices(clientapp.node_settings(ctx))
        cfg = to_train_config(m.content[C.KEY_CONFIG], int(ctx.node_config[C.KEY_PARTITION_ID]))
        for start, should_match in ((first[node], True), (initial, False)):
            replica = build_model("resnet18", 2, finetune=finetune, last_k=1)
            state = {**initial, **_unpacked(m, initial, parts.shared)}
            state.update({k: start[k] for k in parts.local})
            replica.load_state_dict(state)
            train_local(replica, cache.images, cache.labels, train_idx, cfg, "cpu")
            after = replica.state_dict()
            same = all(torch.equal(after[k], own[k]) for k in parts.local)
            assert same == should_match, (node, should_match)

    records = read_metrics(run_dir)
    assert [r["clients_new_bn"] for r in records[1:]] == [3, 0]
    assert all(0.0 <= r["client_val_accuracy"] <= 1.0 for r in records[1:])
    assert summary["selection"] == "client_val_accuracy" and summary["local_bn"] is True
    best = max(records[1:], key=lambda r: (r["client_val_accuracy"], -r["round"]))
    assert summary["best_round"] == best["round"]


def test_a_node_the_superlink_lost_is_asked_again_not_fatal():
    # CI, 2026-11-28: after a SuperLink restart a node still listed but not heartbeating got the
    # SuperLink's "Node Unavailable" error reply to its query, which failed the resumed run.
    from fedvision.fl.directory import ClientDirectory

    class Lagging(ScriptedGrid):
        def __init__(self):
            super().__init__(nodes=(101, 102))
            self.lost = {102}

        def send_and_receive(self, messages, timeout):
            out = []
            for m in messages:
                if m.metadata.dst_node_id in self.lost:
                    out.append(Message(Error(code=5, reason="Node Unavailable"), reply_to=m))
                else:
                    out += super().send_and_receive([m], timeout)
            return out

    grid = Lagging()
    directory = ClientDirectory(2)
    assert directory.refresh(grid) == [0]  # node 102 lost: no error, not yet known
    grid.lost.clear()  # its heartbeats resume
    assert directory.refresh(grid) == [1]
    assert directory.partition_of == {101: 0, 102: 1}


class OneBehind(ScriptedGrid):
    """Node 102 answers each query only when the server next lists the nodes (a SuperNode still
    busy with a dead run's task works through its queries late, in order)."""

    def __init__(self):
        super().__init__(nodes=(101, 102))
        self.backlog: list[Message] = []
        self.queries_to_102 = 0

    def get_node_ids(self):
        if self.backlog:
            self.pending = [
                *getattr(self, "pending", []),
                *super().send_and_receive(self.backlog[:1], None),
            ]
            del self.backlog[:1]
        return self.nodes

    def send_and_receive(self, messages, timeout):
        late = [m for m in messages if m.metadata.dst_node_id == 102]
        self.queries_to_102 += len(late)
        self.backlog += late
        return super().send_and_receive([m for m in messages if m not in late], timeout)


def test_a_node_that_answers_its_queries_late_is_counted_when_the_answer_comes():
    # CI, 2026-12-06: after a SuperLink restart a client mid-task of the dead run answered 11
    # queries of the resumed run, each after the server had given up on it and sent a new one.
    from fedvision.fl.directory import ClientDirectory

    grid = OneBehind()
    directory = ClientDirectory(2)
    assert directory.refresh(grid, timeout_s=0.05) == [0]  # 102 has not answered yet
    assert directory.refresh(grid, timeout_s=0.05) == [1]  # its answer to the first query
    assert directory.partition_of == {101: 0, 102: 1}
    assert grid.queries_to_102 == 2
    directory.refresh(grid, timeout_s=0.05)
    assert grid.queries_to_102 == 2  # counted: not asked again


def test_a_node_that_never_answers_is_named_in_the_timeout_error():
    from fedvision.fl.directory import ClientDirectory

    grid = OneBehind()
    grid.get_node_ids = lambda: grid.nodes  # 102 never answers
    with pytest.raises(
        FedvisionError, match=r"partitions present: \[0\]; node 102: \d+ queries not answered"
    ):
        ClientDirectory(2).wait_for_all(grid, timeout_s=0.5)


def test_a_node_that_never_answers_keeps_at_most_eight_queries_open():
    from fedvision.fl.directory import OPEN_QUERIES, ClientDirectory

    grid = OneBehind()
    grid.get_node_ids = lambda: grid.nodes  # 102 never answers
    directory = ClientDirectory(2)
    for _ in range(12):
        directory.refresh(grid, timeout_s=0.0)
    with pytest.raises(FedvisionError, match=rf"node 102: {OPEN_QUERIES} queries not answered"):
        directory.wait_for_all(grid, timeout_s=0.01)


class Listed(ScriptedGrid):
    """A grid whose connected nodes a test changes; node ``n`` claims ``claims[n]``."""

    def __init__(self, claims: dict[int, int]):
        super().__init__(nodes=tuple(claims))
        self.claims = claims

    def send_and_receive(self, messages, timeout):
        out = []
        for m in messages:
            metrics = MetricRecord({C.KEY_PARTITION_ID: self.claims[m.metadata.dst_node_id]})
            out.append(Message(RecordDict({"metrics": metrics}), reply_to=m))
        return out


def test_a_partition_belongs_to_its_first_claimant_while_it_is_connected():
    from fedvision.fl.directory import ClientDirectory

    events = []
    grid = Listed({101: 0, 102: 1})
    directory = ClientDirectory(2, on_event=events.append)
    assert directory.refresh(grid) == [0, 1]
    # A node that joins late claiming partition 1 is refused: 102 keeps it.
    grid.claims[103] = 1
    grid.nodes.append(103)
    assert directory.refresh(grid) == []
    assert directory.partition_of == {101: 0, 102: 1}
    assert directory.refresh(grid) == []  # refused once, not reported at every round
    # The holder leaves: the next claimant holds partition 1 ...
    grid.nodes.remove(102)
    assert directory.refresh(grid) == [1]
    assert directory.partition_of == {101: 0, 103: 1}
    # ... until the first claimant comes back under its own id (a registered key's node id).
    grid.nodes.append(102)
    assert directory.refresh(grid) == [1]
    assert directory.partition_of == {101: 0, 102: 1}
    got = [
        (e["event"], e["node"], e["partition"], e.get("held_by"), e.get("before")) for e in events
    ]
    gone = [e.get("before_gone") for e in events if e["event"] == "holds"]
    assert gone == [None, None, True, False]  # 102 left; then 102, the first claimant, is back
    from fedvision.rundir import describe_node_event

    assert describe_node_event(events[3]).endswith("from node 102 to 103 (it is gone)")
    assert describe_node_event(events[4]).endswith("(node 102 claimed it first)")
    assert got == [
        ("holds", 101, 0, None, None),
        ("holds", 102, 1, None, None),
        ("refused", 103, 1, 102, None),
        ("holds", 103, 1, None, 102),
        ("holds", 102, 1, None, 103),
        ("refused", 103, 1, 102, None),
    ]
    # A node back from a restart is asked again: it may hold another partition now.
    grid.nodes.remove(101)
    directory.refresh(grid)
    grid.claims[101] = 1
    grid.nodes.append(101)
    directory.refresh(grid)
    assert directory.partition_of == {102: 1}  # 101's claim on 1 is the newest


def test_a_resumed_server_keeps_the_claim_order_of_the_run():
    from fedvision.fl.directory import ClientDirectory

    # nodes.jsonl says 105 held partition 1 before the restart; 103 claims it too and would
    # come first among this server's answers (lower id), but 105 claimed first.
    grid = Listed({101: 0, 103: 1, 105: 1})
    directory = ClientDirectory(2, held_before=[(101, 0), (105, 1)])
    directory.refresh(grid)
    assert directory.partition_of == {101: 0, 105: 1}
    # A node from the history that is not connected holds nothing.
    grid.nodes.remove(105)
    directory.refresh(grid)
    assert directory.partition_of == {101: 0, 103: 1}


class WithAttacker(InlineGrid):
    """The real clients; after round 1 has been sent, node 666 joins claiming partition 1 and
    answers a train message with huge weights and a huge example count."""

    ATTACKER = 666

    def __init__(self, run_dir, num_nodes: int) -> None:
        super().__init__(run_dir, num_nodes)
        self.trained = self.attacked = 0

    def get_node_ids(self) -> list[int]:
        return [*self.contexts, *([self.ATTACKER] if self.trained else [])]

    def send_and_receive(self, messages, timeout):
        mine = [m for m in messages if m.metadata.dst_node_id == self.ATTACKER]
        theirs = [m for m in messages if m.metadata.dst_node_id != self.ATTACKER]
        self.trained += sum(m.metadata.message_type == "train" for m in theirs)
        replies = super().send_and_receive(theirs, timeout)
        for m in mine:
            if m.metadata.message_type == "query":
                metrics = MetricRecord({C.KEY_PARTITION_ID: 1})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=m))
            else:
                self.attacked += 1
                poisoned = {k: np.full_like(v.numpy(), 1e6) for k, v in m.content["arrays"].items()}
                metrics = MetricRecord({C.KEY_NUM_EXAMPLES: 10_000, C.KEY_TRAIN_LOSS: 0.0})
                content = RecordDict({"arrays": ArrayRecord(poisoned), "metrics": metrics})
                replies.append(Message(content, reply_to=m))
        return replies


def test_a_node_claiming_a_held_partition_is_sent_nothing_and_changes_nothing(
    dataset, tmp_path, capsys
):
    clean = prepared(dataset, tmp_path / "clean", "num_rounds=3")
    serve(InlineGrid(clean, 2), clean)
    run_dir = prepared(dataset, tmp_path / "attacked", "num_rounds=3")
    grid = WithAttacker(run_dir, 2)
    serve(grid, run_dir)
    assert grid.trained == 6 and grid.attacked == 0  # asked its partition, then sent nothing
    a = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    b = torch.load(clean / C.CKPT_LATEST, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["clients"] for r in read_metrics(run_dir)[1:]] == [[0, 1]] * 3
    events = [json.loads(line) for line in (run_dir / C.RUN_NODES).read_text().splitlines()]
    got = [(e["event"], e["node"], e["partition"], e.get("held_by")) for e in events]
    assert got == [("holds", 1000, 0, None), ("holds", 1001, 1, None), ("refused", 666, 1, 1001)]
    assert "node 666 claims partition 1, held by node 1001: refused" in capsys.readouterr().err


def test_the_run_plan_names_the_app_pair_and_the_runtimes_timeouts(dataset, tmp_path):
    from fedvision.fl.secagg import DEFAULT_APPS
    from fedvision.rundir import read_plan

    plan = read_plan(prepared(dataset, tmp_path, "runtime.round_timeout_s=42"))
    assert (plan.server_app, plan.client_app) == DEFAULT_APPS
    # The server reads its waits from run.json, as the runtime was configured.
    assert (plan.connect_timeout_s, plan.round_timeout_s) == (0.5, 42.0)


@pytest.mark.parametrize(
    ("reason", "line"),
    [
        ("ValueError: boom", "ValueError: boom"),
        (
            "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
            "ClientAppException occurred. Message: \nTraceback (most recent call last):\n"
            '  File "x.py", line 1\nValueError: boom\'>',
            "ValueError: boom",
        ),
        (
            "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly.\n"
            "\tclass_name: ClientAppActor\n\tThe actor's node was lost.'>",
            "The actor's node was lost.",
        ),
        ("<class 'fedvision.errors.FedvisionError'>:<'bad input'>", "FedvisionError: bad input"),
        ("  \n ", "error code 7"),
    ],
)
def test_an_error_reason_is_shown_as_its_last_line_without_flower_s_wrapping(reason, line):
    from fedvision.fl.directory import reason_line

    assert reason_line(reason, 7) == line
