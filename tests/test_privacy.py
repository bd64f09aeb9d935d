"""Differential privacy: noise scale, clipping, epsilon, budget, refusals, DP-SGD, a DP run.

Every number is checked against a hand computation or against Opacus' accountant called directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.validators import ModuleValidator
from torch import nn

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.engine import TrainConfig
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp
from fedvision.fl.server import serve
from fedvision.privacy import ClientLevelAccountant, rdp_epsilon
from fedvision.privacy.client import clipping_mod
from fedvision.privacy.dpsgd import DPSGDConfig, check_dpsgd_model, train_local_dpsgd
from fedvision.privacy.plan import PrivacyPlan
from fedvision.privacy.server import update_norm_record, wrap_strategy
from fedvision.report.metrics import read_metrics
from fedvision.report.table import write_report
from fedvision.runner import check_config
from tests.grids import InlineGrid
from tests.test_server_loop import prepared

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fedvision.data.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("dp") / "gen", num_classes=3, num_source=1, train_per_class=12,
        val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


def _cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


def _reply(flat: np.ndarray, node: int, weight: int = 1) -> Message:
    sent = Message(
        content=RecordDict({C.KEY_ARRAYS: ArrayRecord({C.KEY_FLAT: Array(flat)})}),
        dst_node_id=node,
        message_type="train",
    )
    content = RecordDict(
        {
            C.KEY_ARRAYS: ArrayRecord({C.KEY_FLAT: Array(flat.astype(np.float32))}),
            C.KEY_METRICS: MetricRecord({C.KEY_NUM_EXAMPLES: weight}),
        }
    )
    return Message(content, reply_to=sent)


def _wrapper(option: str, num_clients: int, *overrides: str):
    cfg = _cfg(f"privacy={option}", f"num_clients={num_clients}", *overrides)
    return wrap_strategy(cfg, FedAvg(fraction_evaluate=0.0, min_train_nodes=1))


# --- noise scale and clipping --------------------------------------------------------------------


@pytest.mark.parametrize("option", ["server_fixed", "client_fixed"])
@pytest.mark.parametrize(("z", "c", "m"), [(2.0, 0.5, 4), (1.0, 3.0, 2)])
def test_the_noise_std_is_noise_multiplier_times_clipping_norm_over_sampled_clients(
    option, z, c, m
):
    wrapper = _wrapper(
        option, m, f"privacy.wrapper.noise_multiplier={z}", f"privacy.wrapper.clipping_norm={c}"
    )
    assert wrapper.num_sampled_clients == m  # fraction_train=1: every client
    n = 40_000
    glob = np.zeros(n, dtype=np.float32)
    wrapper.current_arrays = ArrayRecord({C.KEY_FLAT: Array(glob)})  # what configure_train keeps
    # Identical updates of 0.05 per value (norm 10, so clipped to c): an all-zero update would
    # make Flower's clipping divide by its norm, 0 (ZeroDivisionError in clip_inputs_inplace).
    update = np.full(n, 0.05, dtype=np.float32)
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    out, _ = wrapper.aggregate_train(1, [_reply(glob + update, k) for k in range(m)])
    clipped = c / math.sqrt(n)  # each value of an update clipped to norm c
    noise = out[C.KEY_FLAT].numpy() - (clipped if option == "server_fixed" else 0.05)
    hand = z * c / m  # 0.25 and 1.5
    # The std of 40,000 normal draws is within 1.5 % of sigma with overwhelming probability.
    assert float(noise.std()) == pytest.approx(hand, rel=0.015)
    assert abs(float(noise.mean())) < 4 * hand / math.sqrt(n)


def test_server_side_clipping_bounds_each_update_at_the_clipping_norm():
    wrapper = _wrapper(
        "server_fixed", 2, "privacy.wrapper.noise_multiplier=0", "privacy.wrapper.clipping_norm=1"
    )
    base = np.full(4, 10.0, dtype=np.float32)
    wrapper.current_arrays = ArrayRecord({C.KEY_FLAT: Array(base)})
    big = base + np.array([6.0, 8.0, 0.0, 0.0], dtype=np.float32)  # update norm 10 -> 1
    small = base + np.array([0.0, 0.0, 0.3, -0.4], dtype=np.float32)  # norm 0.5: kept
    out, _ = wrapper.aggregate_train(1, [_reply(big, 1), _reply(small, 2)])
    # Plain mean of the clipped updates: ((0.6, 0.8, 0, 0) + (0, 0, 0.3, -0.4)) / 2.
    np.testing.assert_allclose(
        out[C.KEY_FLAT].numpy() - base, [0.3, 0.4, 0.15, -0.2], rtol=1e-5, atol=1e-6
    )


def test_update_norms_are_measured_against_what_was_sent_and_count_clipping():
    base = np.full(4, 10.0, dtype=np.float32)
    sent = ArrayRecord({C.KEY_FLAT: Array(base)})
    moves = ([3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.3, -0.4], [0.0, 0.0, 0.0, 2.0])  # norms 5, 0.5, 2
    replies = [_reply(base + np.array(m, dtype=np.float32), k) for k, m in enumerate(moves)]
    record = update_norm_record(replies, sent, clipping_norm=1.0)
    assert record == pytest.approx(
        {"update_norm_median": 2.0, "update_norm_max": 5.0, "clipped_fraction": 2 / 3}
    )
    assert "clipped_fraction" not in update_norm_record(replies, sent, clipping_norm=None)
    assert update_norm_record([], sent, clipping_norm=1.0) == {}


@pytest.mark.parametrize(("mode", "norm_bit"), [("client-fixed", None), ("client-adaptive", 1)])
def test_the_client_mod_clips_what_travels_when_the_round_config_says_so(mode, norm_bit):
    glob = np.arange(5, dtype=np.float32)
    update = np.array([3.0, 0.0, 4.0, 0.0, 0.0], dtype=np.float32)  # norm 5
    config = ConfigRecord({C.KEY_DP_MODE: mode, "clipping_norm": 2.0})
    msg = Message(
        content=RecordDict(
            {C.KEY_ARRAYS: ArrayRecord({C.KEY_FLAT: Array(glob)}), C.KEY_CONFIG: config}
        ),
        dst_node_id=1,
        message_type="train",
    )

    def train(m, ctx):
        return _reply(glob + update, 1).__class__(
            RecordDict(
                {
                    C.KEY_ARRAYS: ArrayRecord({C.KEY_FLAT: Array(glob + update)}),
                    C.KEY_METRICS: MetricRecord({C.KEY_NUM_EXAMPLES: 1}),
                }
            ),
            reply_to=m,
        )

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = clipping_mod(msg, ctx, train)
    sent_update = out.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy() - glob
    np.testing.assert_allclose(sent_update, [1.2, 0.0, 1.6, 0.0, 0.0], rtol=1e-6)  # 2 * u / 5
    assert out.content[C.KEY_METRICS].get("norm_bit") == norm_bit
    # Without client-level DP in the config the reply passes untouched.
    msg.content[C.KEY_CONFIG] = ConfigRecord({C.KEY_DP_MODE: "server-fixed"})
    untouched = clipping_mod(msg, ctx, train).content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
    np.testing.assert_array_equal(untouched, glob + update)


# --- accounting and budget -----------------------------------------------------------------------


def _opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    rdp = rdp_analysis.compute_rdp(
        q=q, noise_multiplier=z, steps=steps, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    alphas = RDPAccountant.DEFAULT_ALPHAS
    return float(rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)[0])


def test_the_reported_epsilon_is_opacus_rdp_for_the_same_parameters():
    acc = ClientLevelAccountant(noise_multiplier=1.1, sample_rate=0.3, delta=1e-5)
    got = [acc.step() for _ in range(5)]
    want = [_opacus_epsilon(1.1, 0.3, k, 1e-5) for k in range(1, 6)]
    assert got == pytest.approx(want, rel=1e-12)
    assert all(a < b for a, b in itertools.pairwise(got))  # composition only adds
    # Without noise there is no guarantee: epsilon is infinite.
    assert ClientLevelAccountant(0.0, 1.0, 1e-5).epsilon_after(1) == math.inf


def test_the_budget_stops_before_the_round_that_would_pass_it():
    e2, e3 = _opacus_epsilon(1.0, 0.5, 2, 1e-5), _opacus_epsilon(1.0, 0.5, 3, 1e-5)
    acc = ClientLevelAccountant(1.0, 0.5, 1e-5, max_epsilon=(e2 + e3) / 2)
    assert acc.next_round_exceeds(1) is None
    acc.step()
    assert acc.next_round_exceeds(2) is None
    acc.step()
    reason = acc.next_round_exceeds(3)
    assert reason is not None and f"epsilon={e3:.4g} >" in reason
    assert acc.epsilon == pytest.approx(e2) and acc.epsilon <= acc.max_epsilon


def test_one_rdp_function_gives_the_epsilon_of_both_levels():
    # Client-level rounds and DP-SGD steps are the same mechanism: one function, Opacus' figure.
    acc = ClientLevelAccountant(1.1, 0.3, 1e-5)
    assert acc.epsilon_after(4) == rdp_epsilon([1.1] * 4, 0.3, 1e-5)
    assert rdp_epsilon([1.2] * 7, 0.25, 1e-5) == pytest.approx(
        _opacus_epsilon(1.2, 0.25, 7, 1e-5), rel=1e-12
    )
    assert rdp_epsilon([], 0.5, 1e-5) == 0.0  # nothing released
    assert rdp_epsilon([1.0, 0.0], 0.5, 1e-5) == math.inf  # one release without noise


@pytest.mark.parametrize(
    ("option", "mode", "server_norm", "dpsgd"),
    [
        ("none", "none", None, False),
        ("server_fixed", "server-fixed", 1.0, False),
        ("client_fixed", "client-fixed", None, False),
        ("server_adaptive", "server-adaptive", None, False),
        ("client_adaptive", "client-adaptive", None, False),
        ("dpsgd", "none", None, True),
    ],
)
def test_the_plan_reads_each_privacy_option_once(option, mode, server_norm, dpsgd):
    plan = PrivacyPlan.from_config(_cfg(f"privacy={option}", "num_clients=4"))
    assert plan.mode == mode and plan.client_level == (mode != "none")
    assert plan.server_clipping_norm == server_norm
    assert (plan.dpsgd is not None) == dpsgd and plan.any == (mode != "none" or dpsgd)
    assert plan.num_clients == 4 and plan.num_sampled_clients == 4 and plan.delta == 1e-5
    assert (plan.accountant() is not None) == plan.client_level
    config = plan.round_config()
    assert config[C.KEY_DP_MODE] == mode
    assert (C.KEY_DPSGD_NOISE in config) == dpsgd
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.mode = "none"


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=server_fixed", "privacy.wrapper.noise_multiplier=-1"], "noise_multiplier=-1.0"),
        (["privacy=client_fixed", "privacy.wrapper.clipping_norm=0"], "clipping_norm=0.0 must"),
        (["privacy=server_fixed", "privacy.wrapper.clipping_norm=-2"], "clipping_norm=-2.0 must"),
        (
            ["privacy=client_adaptive", "privacy.wrapper.initial_clipping_norm=0"],
            "initial_clipping_norm=0.0",
        ),
        (["privacy=server_fixed", "privacy.delta=1.0"], r"delta=1.0 must lie in \(0, 1\)"),
        (["privacy=server_fixed", "privacy.delta=0"], r"delta=0.0 must lie in \(0, 1\)"),
        (["privacy=server_fixed", "privacy.max_epsilon=0"], "max_epsilon=0.0 must be > 0"),
        (["privacy=server_fixed", "privacy.max_epsilon=-3"], "max_epsilon=-3.0 must be > 0"),
        (
            ["privacy=server_fixed", "privacy.max_epsilon=0.01", "model.finetune=head"],
            "below one round's epsilon",
        ),
        (
            [
                "privacy=server_fixed",
                "privacy.max_epsilon=5",
                "model.finetune=head",
                "privacy.wrapper.noise_multiplier=0",
            ],
            "needs privacy.wrapper.noise_multiplier > 0",
        ),
        (["privacy=server_fixed"], "BatchNorm running statistics"),
        (["privacy=client_adaptive", "model.finetune=last_k"], "BatchNorm running statistics"),
        (["privacy=none", "privacy.max_epsilon=5"], "pick a client-level option"),
        (["privacy=server_fixed", "strategy=fedadam"], "FedAdam does not compute"),
        (["privacy=client_fixed", "strategy=fedmedian"], "FedMedian does not compute"),
        (["privacy=server_adaptive", "strategy=krum"], "Krum does not compute"),
        (["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=-1"], "noise_multiplier=-1.0 must"),
        (["privacy=dpsgd", "privacy.dpsgd.max_grad_norm=0"], "max_grad_norm=0.0 must be > 0"),
        (["privacy=dpsgd", "strategy=fedprox"], "proximal term"),
        (["privacy=dpsgd", "strategy=scaffold"], "SCAFFOLD's gradient correction"),
        (["privacy=server_fixed", "strategy=scaffold"], "Scaffold does not compute"),
        (["privacy=dpsgd", "client.local_bn=true", "strategy.fraction_evaluate=1"], "local_bn"),
    ],
)
def test_impossible_privacy_settings_are_refused_in_one_line_before_any_work(overrides, message):
    cfg = compose_config(["runtime=prepare_only", *overrides])
    with pytest.raises(FedvisionError, match=message) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)


def test_client_level_dp_accepts_batchnorm_in_eval_mode_whose_statistics_never_travel():
    base = ["runtime=prepare_only", "privacy=server_fixed"]
    with pytest.raises(FedvisionError, match=r"client\.bn_mode=eval"):
        check_config(compose_config(base))  # the refusal names the new way out
    check_config(compose_config([*base, "client.bn_mode=eval"]))  # nothing un-noised travels


def test_dpsgd_refuses_a_model_opacus_cannot_train_in_one_line():
    # A trainable layer with buffers (running statistics) that is no BatchNorm: not fixable here.
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Flatten(), nn.LazyLinear(2),
    )  # fmt: skip
    with pytest.raises(FedvisionError, match="DP-SGD cannot train Sequential") as info:
        check_dpsgd_model(net)
    assert "\n" not in str(info.value)


# --- DP-SGD --------------------------------------------------------------------------------------


def _tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def _data(n: int = 24):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 3, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)


def test_dpsgd_trains_a_groupnorm_model_and_reports_opacus_epsilon():
    net = ModuleValidator.fix(_tiny_bn_net())  # BatchNorm -> GroupNorm, Opacus' own fix
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    before = [p.detach().clone() for p in net.parameters()]
    images, labels = _data()
    cfg = TrainConfig(epochs=0, max_steps=4, batch_size=6, lr=0.1, augment="none", seed=1)
    res = train_local_dpsgd(
        net, images, labels, np.arange(24), cfg, DPSGDConfig(1.2, 1.0, 1e-5), "cpu", prior_steps=3
    )
    assert res.steps == 4 and res.total_steps == 7 and res.sample_rate == pytest.approx(0.25)
    assert math.isfinite(res.epsilon) and res.epsilon > 0
    assert res.epsilon == pytest.approx(_opacus_epsilon(1.2, 0.25, 7, 1e-5), rel=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())  # Opacus cleaned up


def test_dpsgd_freezes_batchnorm_and_clips_each_sample_gradient():
    net = _tiny_bn_net()
    bn = net[1]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    before = [p.detach().clone() for p in net.parameters()]
    images, labels = _data()
    # One step over every sample (q = 1), plain SGD, noise negligible: the step is -lr times the
    # mean of the clipped per-sample gradients, so its norm is at most lr * max_grad_norm.
    cfg = TrainConfig(
        epochs=0, max_steps=1, batch_size=24, lr=1.0, momentum=0.0, weight_decay=0.0,
        augment="none",
    )  # fmt: skip
    clip = 1e-3  # far below these gradients' norms, so clipping is active
    train_local_dpsgd(net, images, labels, np.arange(24), cfg, DPSGDConfig(1e-9, clip, 1e-5), "cpu")
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(net.parameters(), before, strict=True)]
    )
    assert 0 < float(step.norm()) <= clip * (1 + 1e-4)
    for k, v in bn.state_dict().items():  # statistics and affine weights as received
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in net.parameters())  # unfrozen again afterwards
    assert net[2].inplace  # in-place activations restored


# --- runs ----------------------------------------------------------------------------------------


COMMON = ("client.local_steps=1", "client.batch_size=4", "client.augment=none")
# Client-level DP sends parameters only: a frozen BatchNorm (head) keeps statistics home.
HEAD = "model.finetune=head"


def test_a_two_round_server_fixed_run_records_epsilon_every_round(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path / "run", *COMMON, HEAD, "num_rounds=2", "privacy=server_fixed",
        "privacy.wrapper.noise_multiplier=0.8", "privacy.wrapper.clipping_norm=0.002",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    summary = serve(grid, run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["round"] > 0]
    # q = 2 sampled / 2 clients = 1: each round is one Gaussian mechanism with z = 0.8.
    assert [r["epsilon"] for r in rounds] == pytest.approx(
        [_opacus_epsilon(0.8, 1.0, k, 1e-5) for k in (1, 2)], rel=1e-12
    )
    assert [r["dp_releases"] for r in rounds] == [1, 2]
    assert summary["epsilon"] == rounds[-1]["epsilon"]
    assert summary["privacy"]["sample_rate"] == 1.0 and "Poisson" in summary["privacy"]["sampling"]
    # Equal weights: every train reply weighs 1 and carries its real count as num-train.
    replies = [reply for msg, reply, _ in grid.log if msg.metadata.message_type == "train"]
    assert {r.content[C.KEY_METRICS][C.KEY_NUM_EXAMPLES] for r in replies} == {1}
    assert all(r.content[C.KEY_METRICS][C.KEY_NUM_TRAIN] > 1 for r in replies)
    assert all(math.isfinite(r["test_loss"]) for r in rounds)
    # The norms are measured before the wrapper clips: its clipping rewrites the replies in
    # place, so after the round every update has norm C = 0.5 and the recorded ones are larger.
    first = [(m, r) for m, r, _ in grid.log if m.metadata.message_type == "train"][:2]
    for m, r in first:
        moved = (
            r.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
            - m.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
        )
        assert np.linalg.norm(moved.astype(np.float64)) == pytest.approx(0.002, rel=1e-4)
    assert rounds[0]["update_norm_median"] > 0.002 and rounds[0]["clipped_fraction"] == 1.0
    report = write_report([run_dir], tmp_path / "report")
    assert "ε (δ)" in report and f"{rounds[-1]['epsilon']:.2f} (1e-05)" in report


def test_client_side_clipping_leaves_federated_evaluation_working(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, *COMMON, HEAD, "num_rounds=1", "privacy=client_fixed",
        "strategy.fraction_evaluate=1.0", "strategy.min_evaluate_nodes=2",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    record = read_metrics(run_dir)[-1]
    assert record["client_val_accuracy"] is not None and record["epsilon"] > 0
    train = [(m, r) for m, r, _ in grid.log if m.metadata.message_type == "train"]
    assert all(m.content[C.KEY_CONFIG]["clipping_norm"] == 1.0 for m, _ in train)
    for msg, reply in train:  # every update that travelled is clipped to the norm
        update = reply.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
        update = update - msg.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy()
        assert float(np.linalg.norm(update)) <= 1.0 + 1e-4


def test_the_budget_stops_the_run_cleanly_before_it_is_exceeded(dataset, tmp_path):
    e2, e3 = (_opacus_epsilon(1.0, 1.0, k, 1e-5) for k in (2, 3))
    run_dir = prepared(
        dataset, tmp_path, *COMMON, HEAD, "num_rounds=4", "privacy=server_fixed",
        f"privacy.max_epsilon={(e2 + e3) / 2}",
    )  # fmt: skip
    summary = serve(InlineGrid(run_dir, 2), run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2] and summary["rounds_done"] == 2
    assert summary["epsilon"] == pytest.approx(e2) and summary["epsilon"] < (e2 + e3) / 2
    assert "round 3 would reach" in summary["stopped"]
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"


def test_dpsgd_clients_report_a_growing_sample_level_epsilon(dataset, tmp_path):
    run_dir = prepared(dataset, tmp_path, *COMMON, "num_rounds=2", "privacy=dpsgd")
    grid = InlineGrid(run_dir, 2)
    summary = serve(grid, run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["round"] > 0]
    eps = [r["dpsgd_epsilon_max"] for r in rounds]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps[0] < eps[1]
    assert "epsilon" not in rounds[0]  # no client-level DP: no client-level epsilon
    assert summary["privacy"]["level"] == "sample" and summary["epsilon"] == eps[-1]
    # Each client's epsilon composes its steps over both rounds (its Context keeps the count).
    last = [r for m, r, _ in grid.log if m.metadata.message_type == "train"][-2:]
    assert {int(r.content[C.KEY_METRICS][C.KEY_DPSGD_STEPS]) for r in last} == {2}
    assert clientapp.app is not None


def test_a_resumed_run_continues_the_account_and_the_adaptive_clipping_norm(dataset, tmp_path):
    from fedvision.fl.checkpoint import load_checkpoint
    from fedvision.rundir import append_resume

    run_dir = prepared(
        dataset, tmp_path, *COMMON, HEAD, "num_rounds=1", "privacy=server_adaptive",
        "privacy.wrapper.noise_multiplier=0.5",
    )  # fmt: skip
    serve(InlineGrid(run_dir, 2), run_dir)
    ckpt = load_checkpoint(run_dir / C.CKPT_LATEST, arch="resnet18", num_classes=2)
    norm = ckpt.strategy["1.clipping_norm"]["value"]  # depth 1: the wrapper inside the sampling
    assert norm != pytest.approx(0.1)  # it adapted away from the initial norm
    append_resume(run_dir, 1, {"num_rounds": (1, 2)})  # what `resume=... num_rounds=2` records
    serve(InlineGrid(run_dir, 2), run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["round"] > 0]
    assert [r["dp_releases"] for r in rounds] == [1, 2]
    assert rounds[-1]["epsilon"] == pytest.approx(_opacus_epsilon(0.5, 1.0, 2, 1e-5), rel=1e-12)
