"""Three kinds of model entries: parameters to the strategy, BatchNorm statistics beside it,
counters nowhere; and client-level epsilon at the noise actually added (issue: results a
reviewer can trust)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from test_server_loop import prepared

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.fl.arrays import layout_of, pack, unpack
from fedvision.fl.checkpoint import load_checkpoint
from fedvision.fl.parts import mean_stats, run_parts, subset, take_stats
from fedvision.fl.server import serve
from fedvision.models import split_parts
from fedvision.privacy import effective_noise_multiplier
from fedvision.privacy.plan import check_privacy
from fedvision.privacy.server import update_norm_record
from fedvision.report.metrics import read_metrics
from fedvision.rundir import append_resume, load_run_config
from tests.grids import InlineGrid, PushPull

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fedvision.data.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("entries") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


# --- update norms measure parameters -----------------------------------------------------------


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def _reply(arrays: ArrayRecord) -> Message:
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    return Message(RecordDict({C.KEY_ARRAYS: arrays, C.KEY_METRICS: MetricRecord()}), reply_to=sent)


def test_update_norm_is_the_hand_computed_norm_of_the_parameter_deltas():
    model = _tiny()
    parts = split_parts(model)
    assert parts.shared == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert parts.stats == ("1.running_mean", "1.running_var")
    assert parts.counters == ("1.num_batches_tracked",)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {k: v.clone() for k, v in before.items()}
    after["0.weight"][0, 0] += 0.3  # deltas 0.3, -0.4 (weights) and 1.2 (a bias): norm 1.3
    after["0.weight"][1, 1] -= 0.4
    after["1.bias"][0] += 1.2
    after["1.running_var"] += 50.0  # statistics and counters moved a lot, as training does
    after["1.num_batches_tracked"] += 400

    def packed(state):
        return pack(ArrayRecord({k: Array(state[k].numpy()) for k in parts.shared}))

    record = update_norm_record([_reply(packed(after))], packed(before), clipping_norm=1.0)
    assert record["update_norm_median"] == pytest.approx(1.3, rel=1e-6)
    assert record["update_norm_max"] == pytest.approx(1.3, rel=1e-6)
    assert record["clipped_fraction"] == 1.0


def test_a_batchnorm_models_update_norms_scale_with_the_learning_rate(dataset, tmp_path):
    """At lr 1e-8 and 1e-9 the update is in its linear regime: the norm scales with lr.

    With the counters inside the update (as before), every norm was at least the step count
    times the root of the number of BatchNorm layers (about 20 here) whatever the lr. From
    random weights at 16 px, BatchNorm over 4 images of 1x1 maps makes gradients of 1e4-1e5,
    so the norm at lr 1e-8 is about 1e-3, not below 1e-4; a pretrained model's is far lower.
    """
    norms = []
    for lr in (1e-8, 1e-9):
        run_dir = prepared(
            dataset, tmp_path / f"lr{lr:g}", "model=shufflenet_v2_x0_5", "model.weights=none",
            f"client.lr={lr}", "client.local_steps=3", "client.batch_size=4", "client.augment=none",
        )  # fmt: skip
        serve(InlineGrid(run_dir, 2), run_dir)
        norms.append(read_metrics(run_dir)[-1]["update_norm_median"])
    assert 0 < norms[0] < 0.05
    # Ten times less lr, several times smaller norms (with the counters the ratio was about 1).
    # Not exactly 10: those 1e4-1e5 gradients make the steps after the first depend on the lr,
    # and how much depends on the CPU's rounding (7.4 on one machine of this kind, within 20 %
    # of 10 on another).
    assert 5 < norms[0] / norms[1] < 15


# --- what travels and what the strategy sees ----------------------------------------------------


def test_take_stats_leaves_one_array_record_and_weighs_by_the_real_count():
    stats = [ArrayRecord({C.KEY_FLAT: Array(np.full(3, v, np.float32))}) for v in (1.0, 4.0)]
    replies = []
    for rec, n in zip(stats, (1, 3), strict=True):
        r = _reply(ArrayRecord({C.KEY_FLAT: Array(np.zeros(2, np.float32))}))
        r.content[C.KEY_BN_STATS] = rec
        r.content[C.KEY_METRICS] = MetricRecord({C.KEY_NUM_EXAMPLES: 1, C.KEY_NUM_TRAIN: n})
        replies.append(r)
    taken = take_stats(replies)
    assert all(list(r.content.array_records) == [C.KEY_ARRAYS] for r in replies)
    mean = mean_stats(taken)[C.KEY_FLAT].numpy()
    np.testing.assert_allclose(mean, [3.25] * 3)  # (1 * 1 + 3 * 4) / 4, not the equal-weight 2.5


class FourNodes(PushPull):
    """Four scripted nodes (partitions 0-3); ``train_content`` answers each train message."""

    def get_node_ids(self):
        return [101, 102, 103, 104]

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            i = m.metadata.dst_node_id - 101
            if m.metadata.message_type == "query":
                content = RecordDict({"metrics": MetricRecord({C.KEY_PARTITION_ID: i})})
            else:
                content = self.train_content(m, i)
            if content is not None:  # None: no reply within the round's timeout
                replies.append(Message(content, reply_to=m))
        return replies

    def train_content(self, m: Message, i: int) -> RecordDict | None:
        raise NotImplementedError


def _moved(m: Message, by: float) -> ArrayRecord:
    flat = m.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
    return ArrayRecord({C.KEY_FLAT: Array((flat + np.float32(by)).astype(np.float32))})


class KrumGrid(FourNodes):
    """Three send equal parameters with other sizes and statistics, one an outlier."""

    sizes = (10, 20, 30, 40)
    stat_values = (1.0, 2.0, 3.0, 4.0)

    def train_content(self, m, i):
        stats = m.content[C.KEY_BN_STATS][C.KEY_FLAT].numpy()
        n = self.sizes[i]
        return RecordDict(
            {
                C.KEY_ARRAYS: _moved(m, 5.0 if i == 3 else 0.01),
                C.KEY_BN_STATS: ArrayRecord(
                    {C.KEY_FLAT: Array(np.full_like(stats, self.stat_values[i]))}
                ),
                C.KEY_METRICS: MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_NUM_TRAIN: n}),
            }
        )


def test_krum_compares_parameters_only_and_statistics_are_example_weighted(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, "num_clients=4", "strategy=krum", "strategy.min_train_nodes=4",
        "partition.min_size=2",
    )  # fmt: skip
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    serve(KrumGrid(), run_dir)
    final = load_checkpoint(run_dir / C.CKPT_LATEST, arch="resnet18", num_classes=2).model
    parts = run_parts(load_run_config(run_dir), 2)
    # The three equal parameter vectors are at distance 0 whatever their sizes: one of them wins.
    for k in parts.shared:
        torch.testing.assert_close(final[k], initial[k].float() + 0.01, rtol=0, atol=1e-6)
    # Statistics: (10*1 + 20*2 + 30*3 + 40*4) / 100 = 3, outside the strategy, outlier included.
    for k in parts.stats:
        torch.testing.assert_close(final[k], torch.full_like(final[k], 3.0))
    for k in parts.counters:  # never sent: the global model keeps its own
        assert int(final[k]) == int(initial[k])


def test_fedadam_keeps_variances_positive_as_the_clients_example_weighted_mean(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, "model=shufflenet_v2_x0_5", "model.weights=none", "strategy=fedadam",
        "num_rounds=5", "client.local_steps=2", "client.batch_size=4",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    train = [
        (
            m,
            sent[C.KEY_BN_STATS][C.KEY_FLAT].numpy(),
            int(r.content[C.KEY_METRICS][C.KEY_NUM_TRAIN]),
        )
        for (m, r, _), sent in zip(grid.log, grid.replied, strict=True)
        if m.metadata.message_type == "train"
    ]
    assert len(train) == 10
    sent = [m.content[C.KEY_BN_STATS][C.KEY_FLAT].numpy() for m, _, _ in train[::2]]
    final = load_checkpoint(run_dir / C.CKPT_LATEST, arch="shufflenet_v2_x0_5", num_classes=2)
    parts = run_parts(load_run_config(run_dir), 2)
    final_stats = pack(
        subset(ArrayRecord({k: Array(v.numpy()) for k, v in final.model.items()}), parts.stats)
    )[C.KEY_FLAT].numpy()
    after = [*sent[1:], final_stats]  # the global statistics after rounds 1..5
    for r in range(5):
        (_, s0, n0), (_, s1, n1) = train[2 * r], train[2 * r + 1]
        expected = (n0 * s0.astype(np.float64) + n1 * s1) / (n0 + n1)
        np.testing.assert_allclose(after[r], expected, rtol=1e-5, atol=1e-7)
    var = [k for k in parts.stats if k.endswith("running_var")]
    assert var and all(bool((final.model[k] > 0).all()) for k in var)


def test_plain_fedavg_is_the_example_weighted_mean_of_every_entry_and_keeps_the_counters(
    tmp_path,
):
    """Plain FedAvg after the split into kinds computes what it computed when the whole state
    travelled in one record (commit 9094b46): every parameter and BatchNorm statistic of the
    global model is the example-weighted mean of the clients' replies, in each of 3 rounds, and
    the counters (which BatchNorm with momentum never reads) keep the server's values.

    Checked against the replies of the same run, not against stored numbers: from random
    weights at 16 px, BatchNorm over 1x1 maps turns float rounding into different weights on
    different CPUs (a stored golden run failed on another machine of the same kind).
    """
    from fedvision.data.generate import generate_dataset

    ds = generate_dataset(
        tmp_path / "gen", num_classes=3, num_source=1, train_per_class=24, val_per_class=4,
        size=16, workers=1, progress=False,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepared(
        ds, run_dir, "model=shufflenet_v2_x0_5", "num_rounds=3", "num_clients=3",
        "partition=dirichlet", "partition.alpha=0.5", "partition.min_size=4",
        "client.local_steps=3", "model.weights=none",
    )  # fmt: skip
    import fedvision.fl.loop as server

    rounds: dict[int, dict[str, torch.Tensor]] = {}
    save = server.save_checkpoint

    def spy(path, ckpt):
        rounds[ckpt.round] = {k: v.clone() for k, v in ckpt.model.items()}
        return save(path, ckpt)

    server.save_checkpoint = spy
    grid = InlineGrid(run_dir, 3)
    try:
        serve(grid, run_dir)
    finally:
        server.save_checkpoint = save
    assert sorted(rounds) == [0, 1, 2, 3]
    parts = run_parts(load_run_config(run_dir), 2)
    assert parts.shared and parts.stats and parts.counters and not parts.local
    train = [
        (sent, int(r.content[C.KEY_METRICS][C.KEY_NUM_TRAIN]))
        for (m, r, _), sent in zip(grid.log, grid.replied, strict=True)
        if m.metadata.message_type == "train"
    ]
    assert len(train) == 9
    layouts = {
        C.KEY_ARRAYS: layout_of({k: rounds[0][k] for k in parts.shared}),
        C.KEY_BN_STATS: layout_of({k: rounds[0][k] for k in parts.stats}),
    }
    for rnd in (1, 2, 3):
        replies = train[3 * (rnd - 1) : 3 * rnd]
        total = sum(n for _, n in replies)
        for record, layout in layouts.items():
            mean: dict[str, np.ndarray] = {}
            for sent, n in replies:
                for k, a in unpack(sent[record], layout).items():
                    mean[k] = mean.get(k, 0.0) + (n / total) * a.numpy().astype(np.float64)
            for k, want in mean.items():
                got = rounds[rnd][k].double().numpy()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{rnd} {k}")
        for k in parts.counters:  # never sent: the global model keeps its own
            assert int(rounds[rnd][k]) == int(rounds[0][k]), (rnd, k)
    moved = [k for k in parts.shared if not torch.equal(rounds[3][k], rounds[0][k])]
    assert len(moved) == len(parts.shared)  # every parameter trained: the check saw real updates


# --- client-level DP: epsilon at the noise added -----------------------------------------------


def _opacus(multipliers: list[float], q: float, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    for z in multipliers:
        acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta))


def test_effective_multiplier_by_hand():
    assert effective_noise_multiplier(1.0, 4, 4) == 1.0
    assert effective_noise_multiplier(1.0, 4, 2) == 0.5  # std z*C/m on a mean of m' = 2
    # Adaptive: z_u = 1, sigma_b = 0.5 -> (1^-2 + 1^-2)^-1/2 = 0.7071 with all replies,
    # (0.5^-2 + 1^-2)^-1/2 = 0.4472 with half of them.
    assert effective_noise_multiplier(1.0, 4, 4, 0.5) == pytest.approx(2**-0.5)
    assert effective_noise_multiplier(1.0, 4, 2, 0.5) == pytest.approx(5**-0.5)
    with pytest.raises(FedvisionError):
        effective_noise_multiplier(1.0, 4, 0)


def _dp_dir(dataset, tmp_path, *extra):
    return prepared(
        dataset, tmp_path, "num_clients=4", "partition.min_size=2", "model.finetune=head",
        "privacy=server_fixed", "privacy.wrapper.noise_multiplier=1.0",
        "runtime.round_timeout_s=0.3", *extra,
    )  # fmt: skip


class EchoGrid(FourNodes):
    """Send the parameters back moved a little (equal weights, as under DP); partitions 2 and 3
    do not reply in ``silent_round``."""

    silent_round = 1

    def train_content(self, m, i):
        if m.content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == self.silent_round and i >= 2:
            return None
        metrics = MetricRecord({C.KEY_NUM_EXAMPLES: 1, C.KEY_NUM_TRAIN: 10 + i})
        # A small move: Flower's DP clipping fails on an all-zero update.
        return RecordDict({C.KEY_ARRAYS: _moved(m, 1e-3 * (i + 1)), C.KEY_METRICS: metrics})


def test_a_dp_round_with_half_the_replies_is_accounted_at_half_the_noise(dataset, tmp_path):
    run_dir = _dp_dir(dataset, tmp_path, "num_rounds=2")
    summary = serve(EchoGrid(), run_dir)
    r1, r2 = (r for r in read_metrics(run_dir) if r["round"] > 0)
    assert (r1["num_clients"], r2["num_clients"]) == (2, 4)
    assert (r1["dp_noise_multiplier"], r2["dp_noise_multiplier"]) == (0.5, 1.0)
    assert r1["epsilon"] == pytest.approx(_opacus([0.5], 1.0), rel=1e-9)
    assert r2["epsilon"] == pytest.approx(_opacus([0.5, 1.0], 1.0), rel=1e-9)
    # Accounted at z = 1 for both rounds, epsilon would be far lower than what was spent.
    assert r2["epsilon"] > 1.5 * _opacus([1.0, 1.0], 1.0)
    assert summary["privacy"]["releases_below_noise_multiplier"] == 1


def test_epsilon_with_partial_sampling_is_opacus_for_the_same_q(dataset, tmp_path):
    run_dir = _dp_dir(dataset, tmp_path, "num_rounds=2", "strategy.fraction_train=0.5")
    grid = EchoGrid()
    grid.silent_round = 0  # everyone sampled replies
    serve(grid, run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["round"] > 0]
    assert [r["num_clients"] for r in rounds] == [2, 2]
    assert rounds[-1]["epsilon"] == pytest.approx(_opacus([1.0, 1.0], 0.5), rel=1e-9)


def test_a_release_that_would_pass_the_budget_is_withheld(dataset, tmp_path):
    budget = (_opacus([1.0], 1.0) + _opacus([0.5], 1.0)) / 2  # fits z = 1, not z = 0.5
    run_dir = _dp_dir(dataset, tmp_path, "num_rounds=2", f"privacy.max_epsilon={budget}")
    serve(EchoGrid(), run_dir)
    r1, r2 = (r for r in read_metrics(run_dir) if r["round"] > 0)
    assert r1["aggregated"] is False and "would reach" in r1["dp_withheld"]
    assert r1["dp_releases"] == 0 and "dp_noise_multiplier" not in r1
    assert r2["dp_releases"] == 1 and r2["epsilon"] == pytest.approx(_opacus([1.0], 1.0))


def test_client_level_dp_refuses_batchnorm_statistics_that_would_travel():
    from fedvision.config import compose_config

    full = compose_config(["model=resnet18", "privacy=server_fixed"])
    with pytest.raises(FedvisionError, match=r"BatchNorm running statistics.*finetune=head"):
        check_privacy(full)
    for fix in ("model.finetune=head", "client.local_bn=true"):
        check_privacy(compose_config(["model=resnet18", "privacy=server_fixed", fix]))


# --- DP-SGD: the server keeps each client's steps ------------------------------------------------


def test_dpsgd_epsilon_after_a_resume_equals_the_uninterrupted_runs(dataset, tmp_path):
    common = ("client.local_steps=2", "client.batch_size=4", "client.augment=none", "privacy=dpsgd")
    whole = prepared(dataset, tmp_path / "whole", *common, "num_rounds=2")
    serve(InlineGrid(whole, 2), whole)
    part = prepared(dataset, tmp_path / "part", *common, "num_rounds=1")
    serve(InlineGrid(part, 2), part)
    append_resume(part, 1, {"num_rounds": (1, 2)})
    serve(InlineGrid(part, 2), part)  # new Contexts: what a resumed simulation gets

    def epsilons(run_dir):
        return [r["dpsgd_epsilon_max"] for r in read_metrics(run_dir) if r["round"] > 0]

    assert epsilons(part) == pytest.approx(epsilons(whole), rel=1e-12)
    assert epsilons(whole)[1] > epsilons(whole)[0]
    steps = load_checkpoint(part / C.CKPT_LATEST, arch="resnet18", num_classes=2).dpsgd_steps
    whole_steps = load_checkpoint(whole / C.CKPT_LATEST, arch="resnet18", num_classes=2)
    assert steps == whole_steps.dpsgd_steps and sorted(steps) == [0, 1]
    assert min(steps.values()) > 0 and math.isfinite(epsilons(part)[-1])
