"""Simulated system heterogeneity: devices, dropout, deadlines, the clock, and their report.

The pure parts (fedvision.system.model) are checked against hand-computed numbers; the round loop
runs with fedvision's real ClientApp in this process (test_server_loop's InlineGrid, no Ray).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_server_loop import prepared

from fedvision import constants as C
from fedvision.cli import main
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp
from fedvision.fl.arrays import unpack
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.report.table import sim_time_to_target
from fedvision.rundir import write_status
from fedvision.system.model import (
    MB,
    ClientPlan,
    Profile,
    SystemConfig,
    SystemModel,
    check_system,
    draw_profiles,
    drops_out,
    local_steps_for,
    read_trace,
    step_budget,
)
from tests.grids import InlineGrid

pytestmark = pytest.mark.usefixtures("task_identity")

TIERS = SystemConfig(distribution="tiers", tiers=(5.0, 20.0, 80.0), tier_weights=(0.3, 0.5, 0.2))
LOGNORMAL = SystemConfig(distribution="lognormal", median_speed=20.0, sigma=0.8, down_mb_s=10.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """test_server_loop's tiny dataset: 2 target classes of 12 training images, 16 px."""
    return generate_dataset(
        tmp_path_factory.mktemp("system") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


def _model(profiles, **kw) -> SystemModel:
    """A system model whose devices are set by hand."""
    model = SystemModel(SystemConfig(distribution="tiers", tiers=(1.0,), **kw), len(profiles), 0)
    model.profiles = list(profiles)
    return model


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TIERS, LOGNORMAL], ids=["tiers", "lognormal"])
def test_profiles_are_the_same_for_a_seed_and_differ_for_another(cfg):
    a, b, other = draw_profiles(cfg, 50, 0), draw_profiles(cfg, 50, 0), draw_profiles(cfg, 50, 1)
    assert a == b and a != other
    assert all(p.speed > 0 for p in a)
    if cfg is TIERS:
        assert {p.speed for p in a} == {5.0, 20.0, 80.0}  # 50 clients meet every tier
    else:  # bandwidth median 10 MB/s and no spread: exactly 10 MB/s; no upload limit
        assert all(p.down_bps == 10 * MB and p.up_bps == math.inf for p in a)


def test_dropouts_and_local_steps_are_the_same_for_a_seed_and_differ_for_another():
    def pattern(seed):
        return [
            (drops_out(seed, r, p, 0.3), local_steps_for(seed, r, p, 1, 10))
            for r in range(1, 21)
            for p in range(10)
        ]

    assert pattern(0) == pattern(0) and pattern(0) != pattern(1)
    steps = [s for _, s in pattern(0)]
    assert min(steps) == 1 and max(steps) == 10  # both ends of [1, 10] are drawn
    # They do not touch the global RNGs.
    state = torch.random.get_rng_state()
    pattern(5)
    assert torch.equal(state, torch.random.get_rng_state())


def test_dropout_rate_over_many_draws_is_near_p():
    draws = [drops_out(3, r, p, 0.3) for r in range(1, 201) for p in range(100)]
    # 20 000 draws: the standard error is sqrt(0.3 * 0.7 / 20000) = 0.0032; 0.01 is 3 of them.
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.01)
    assert not any(drops_out(3, r, 0, 0.0) for r in range(100))
    assert all(drops_out(3, r, 0, 1.0) for r in range(100))


# --- the clock, by hand ---------------------------------------------------------------------------


def test_round_duration_is_the_slowest_client_by_hand():
    # Two clients at 10 and 20 samples/s, 40 samples each, 1 MB down and 1 MB up at 1 MB/s:
    # client 0: 1 s down + 40/10 = 4 s training + 1 s up = 6 s; client 1: 1 + 2 + 1 = 4 s.
    # The round lasts until its slowest client: 6 s.
    model = _model([Profile(10.0, 1 * MB, 1 * MB), Profile(20.0, 1 * MB, 1 * MB)])
    plans = [model.plan(1, p, 1_000_000, 4, None) for p in (0, 1)]
    out = model.outcome(plans, {0: (10, 40, 1_000_000), 1: (10, 40, 1_000_000)})
    assert [r.sim_s for r in out.clients] == pytest.approx([6.0, 4.0])
    assert out.sim_round_s == pytest.approx(6.0)
    assert out.accepted == [0, 1] and out.dropped == []


def test_partial_work_gets_the_steps_that_fit_before_the_deadline_by_hand():
    # Deadline 5 s, 1 MB each way at 1 MB/s (2 s), batch 4 at 10 samples/s = 0.4 s a step:
    # floor((5 - 2) / 0.4) = floor(7.5) = 7 steps. At 20 samples/s (0.2 s a step): 15 steps.
    slow, fast = Profile(10.0, 1 * MB, 1 * MB), Profile(20.0, 1 * MB, 1 * MB)
    assert step_budget(slow, 4, 5.0, 1_000_000, 1_000_000) == 7
    assert step_budget(fast, 4, 5.0, 1_000_000, 1_000_000) == 15
    # Exactly on the deadline still fits: (4 - 2) / 0.4 = 5 steps (not 4 from rounding).
    assert step_budget(slow, 4, 4.0, 1_000_000, 1_000_000) == 5
    model = _model([slow, fast], deadline_s=5.0, deadline_policy="partial")
    assert model.plan(1, 0, 1_000_000, 4, None) == ClientPlan(0, True, 7, bytes_down=1_000_000)
    # A smaller cap of the round config stays; a larger one is cut to the budget.
    assert model.plan(1, 1, 1_000_000, 4, 3).steps == 3
    assert model.plan(1, 1, 1_000_000, 4, 100).steps == 15
    # 7 steps of 4 samples: 2 + 28 / 10 = 4.8 s, inside the deadline; nobody is dropped.
    plans = [model.plan(1, p, 1_000_000, 4, None) for p in (0, 1)]
    out = model.outcome(plans, {0: (7, 28, 1_000_000), 1: (15, 60, 1_000_000)})
    assert out.sim_round_s == pytest.approx(5.0)  # client 1: 2 + 60 / 20 = 5 s
    assert out.accepted == [0, 1]
    # When the transfer alone takes the deadline, not one step fits: the client is not sent.
    tight = _model([slow], deadline_s=2.0, deadline_policy="partial")
    assert tight.plan(1, 0, 1_000_000, 4, None) == ClientPlan(
        0, False, reason="deadline", bytes_down=1_000_000
    )


def test_drop_policy_leaves_out_exactly_the_clients_later_than_the_deadline():
    # 40 samples at 10, 20, 40, 8 samples/s (no transfer time): 4, 2, 1 and 5 s.
    speeds = [10.0, 20.0, 40.0, 8.0]
    model = _model([Profile(s) for s in speeds], deadline_s=3.0, deadline_policy="drop")
    plans = [model.plan(1, p, 0, 4, None) for p in range(4)]
    assert all(p.send and p.steps is None for p in plans)  # drop does not touch the work
    out = model.outcome(plans, {p: (10, 40, 0) for p in range(4)})
    assert out.accepted == [1, 2]
    assert out.dropped == [
        {"partition": 0, "reason": "deadline", "sim_s": pytest.approx(4.0)},
        {"partition": 3, "reason": "deadline", "sim_s": pytest.approx(5.0)},
    ]
    # The server waited for the late ones until the deadline: 3 s, not the 2 s of client 1.
    assert out.sim_round_s == pytest.approx(3.0)
    # Without a late client the round ends with its slowest client: 4 s under a 4 s deadline.
    model.cfg = SystemConfig(distribution="tiers", tiers=(1.0,), deadline_s=4.0)
    out = model.outcome(plans[:3], {p: (10, 40, 0) for p in range(3)})
    assert (out.accepted, out.sim_round_s) == ([0, 1, 2], pytest.approx(4.0))


def test_variable_local_work_sets_each_clients_steps_alone():
    model = SystemModel(
        SystemConfig(distribution="tiers", tiers=(10.0,), local_steps=(2, 9)), 4, seed=7
    )
    for p in range(4):
        plan = model.plan(3, p, 0, 4, 5)
        assert plan.steps == local_steps_for(7, 3, p, 2, 9) and plan.steps_only


# --- refused before any work ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("system.tiers=[5.0,-1.0]", r"system.tiers=\[5.0, -1.0\]: give one or more speeds > 0"),
        ("system.dropout=1.5", r"system.dropout=1.5 must lie in \[0, 1\)"),
        ("system.dropout=1.0", r"system.dropout=1.0 must lie in \[0, 1\): at 1 no client"),
        ("system.dropout=-0.1", r"system.dropout=-0.1 must lie in \[0, 1\)"),
        ("system.deadline_s=0", r"system.deadline_s=0.0 must be > 0"),
        ("system.deadline_s=-3", r"system.deadline_s=-3.0 must be > 0"),
        ("system.deadline_policy=wait", r"deadline_policy='wait' is unknown; use drop or partial"),
        ("system.down_mb_s=0", r"system.down_mb_s=0.0 must be > 0"),
        ("system.local_steps=[5,2]", r"system.local_steps=\[5, 2\] must be \[min, max\]"),
        ("system.tier_weights=[1.0]", r"system.tier_weights=\[1.0\]: one weight >= 0 per tier"),
        ("system.distribution=gamma", r"system.distribution='gamma' is unknown"),
        ("system.dropout=often", r"system.dropout='often': takes a number"),
        ("+system.speed=3", r"system.speed: no such setting"),
    ],
)
def test_impossible_values_are_refused_in_one_line(override, message):
    from fedvision.runner import check_config

    cfg = compose_config(["system=tiers", override])
    # What `fedvision run` calls before it touches any data.
    with pytest.raises(FedvisionError, match=message) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)


def test_lognormal_refuses_a_non_positive_median():
    cfg = compose_config(["system=lognormal", "system.median_speed=-2"])
    with pytest.raises(FedvisionError, match=r"system.median_speed=-2.0 must be > 0"):
        check_system(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.csv", None, "no such file"),
        ("nospeed.csv", "down_mb_s\n5\n", r"device 0: no 'speed'"),
        ("negative.csv", "speed\n10\n-4\n", r"device 1: speed='-4' must be a finite number > 0"),
        ("word.csv", "speed\nfast\n", r"speed='fast' is no number"),
        ("broken.json", '[{"speed": 3', "cannot read it"),
        ("object.json", '{"speed": 3}', "expected a non-empty list of devices"),
        ("empty.csv", "speed\n", "expected a non-empty list of devices"),
        ("gap.csv", "partition,speed\n0,5\n2,5\n", r"must be 0..1 \(num_clients\), each once"),
        ("mixed.csv", "partition,speed\n0,5\n,5\n", "'partition' on every row or on none"),
    ],
)
def test_a_bad_trace_file_is_refused_in_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    cfg = compose_config(["system=trace", f"system.trace={path}", "num_clients=2"])
    with pytest.raises(FedvisionError, match=message) as info:
        check_system(OmegaConf.to_container(cfg, resolve=True))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_trace_pins_devices_to_clients_or_is_drawn_from(tmp_path):
    pinned = tmp_path / "pinned.csv"
    pinned.write_text("partition,speed,up_mb_s\n1,40,0.5\n0,10,\n")
    model = SystemModel(SystemConfig(distribution="trace", trace=str(pinned), up_mb_s=2.0), 2, 0)
    # Per-row bandwidth wins over the config's; a row without it takes the config's.
    assert model.profiles == [Profile(10.0, math.inf, 2 * MB), Profile(40.0, math.inf, 0.5 * MB)]
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"speed": s} for s in (1, 2, 3, 4, 5)]))
    assert [d["speed"] for d in read_trace(devices)] == [1, 2, 3, 4, 5]
    cfg = SystemConfig(distribution="trace", trace=str(devices))
    a, b = draw_profiles(cfg, 30, 0), draw_profiles(cfg, 30, 1)
    assert a == draw_profiles(cfg, 30, 0) and a != b
    assert {p.speed for p in a} <= {1.0, 2.0, 3.0, 4.0, 5.0}


# --- the round loop -------------------------------------------------------------------------------


def _trace(tmp_path, speeds) -> str:
    path = tmp_path / "devices.csv"
    path.write_text("partition,speed\n" + "".join(f"{p},{s}\n" for p, s in enumerate(speeds)))
    return str(path)


def _without_wall_time(records):
    return [{k: v for k, v in r.items() if k != "round_s"} for r in records]


def test_system_none_leaves_the_run_as_it_was(dataset, tmp_path):
    common = ("num_rounds=2", "client.local_steps=1", "client.batch_size=4")
    with_none = prepared(dataset, tmp_path / "none", *common)  # the default: system=none
    without = prepared(dataset, tmp_path / "without", *common, "~system")
    for run_dir in (with_none, without):
        serve(InlineGrid(run_dir, 2), run_dir)
    a, b = read_metrics(with_none), read_metrics(without)
    assert len(a) == 3 and _without_wall_time(a) == _without_wall_time(b)
    assert not any(k.startswith("sim") or k == "num_dropped" for r in a for k in r)
    assert not (with_none / C.RUN_SYSTEM).exists()
    # The group adds no key: a report groups these runs with runs from before it existed.
    assert yaml.safe_load((with_none / C.RUN_CONFIG).read_text())["system"] == {}


def test_deadline_drop_aggregates_only_the_clients_in_time(dataset, tmp_path):
    # Partition 0 trains at 1 sample/s, partition 1 at 1000: with 2 local steps of batch 4 (8
    # samples; no transfer time) they take 8 s and 0.008 s. Deadline 1 s: partition 0 is late.
    run_dir = prepared(
        dataset, tmp_path, "system=trace", f"system.trace={_trace(tmp_path, [1, 1000])}",
        "system.down_mb_s=null", "system.up_mb_s=null", "system.deadline_s=1.0",
        "client.local_steps=2", "client.batch_size=4", "client.augment=none",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    record = read_metrics(run_dir)[1]
    assert record["num_clients"] == 1 and record["num_failures"] == 0
    assert record["dropped"] == [{"partition": 0, "reason": "deadline", "sim_s": 8.0}]
    assert record["sim_round_s"] == record["sim_time_s"] == 1.0  # waited until the deadline
    assert [(c["partition"], c["steps"], c["samples"]) for c in record["sim_clients"]] == [
        (0, 2, 8),
        (1, 2, 8),
    ]
    # Both trained (the server only learns at the deadline); the global model is partition 1's.
    replies = {
        m.metadata.dst_node_id: (r, sent)
        for (m, r, _), sent in zip(grid.log, grid.replied, strict=True)
        if m.metadata.message_type == "train"
    }
    assert sorted(replies) == [1000, 1001]
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    stats = ("running_mean", "running_var")
    params = {k: tuple(t.shape) for k, t in latest.items() if not k.endswith((*stats, "tracked"))}
    stat_shapes = {k: tuple(t.shape) for k, t in latest.items() if k.endswith(stats)}
    reply, sent = replies[1001]
    fast = unpack(reply.content[C.KEY_ARRAYS], params).to_torch_state_dict()
    fast.update(unpack(sent[C.KEY_BN_STATS], stat_shapes).to_torch_state_dict())
    assert len(fast) == len(params) + len(stat_shapes) > 0
    for k, t in fast.items():
        torch.testing.assert_close(latest[k], t.float())
    system = json.loads((run_dir / C.RUN_SYSTEM).read_text())
    assert [c["speed"] for c in system["clients"]] == [1.0, 1000.0]


def test_partial_work_sends_each_client_its_step_budget(dataset, tmp_path):
    # Batch 4 at 8 and 16 samples/s: 0.5 and 0.25 s a step; deadline 1 s, no transfer time:
    # budgets floor(1 / 0.5) = 2 and floor(1 / 0.25) = 4 steps, under the config's cap of 3:
    # partition 0 sends 2, partition 1 keeps 3.
    run_dir = prepared(
        dataset, tmp_path, "system=trace", f"system.trace={_trace(tmp_path, [8, 16])}",
        "system.down_mb_s=null", "system.up_mb_s=null", "system.deadline_s=1.0",
        "system.deadline_policy=partial", "client.local_steps=3", "client.batch_size=4",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    sent = {
        m.metadata.dst_node_id - 1000: (
            m.content[C.KEY_CONFIG]["local-steps"],
            int(r.content[C.KEY_METRICS][C.KEY_STEPS]),
        )
        for m, r, _ in grid.log
        if m.metadata.message_type == "train"
    }
    assert sent == {0: (2, 2), 1: (3, 3)}  # (cap sent, steps the client reports)
    record = read_metrics(run_dir)[1]
    assert record["num_clients"] == 2 and "dropped" not in record
    # Partition 1 holds 10 training images: its 3 steps are one epoch, batches 4 + 4 + 2.
    _, train_idx, _ = clientapp.client_indices(clientapp.node_settings(grid.contexts[1001]))
    assert len(train_idx) == 10
    # Partition 0: 2 steps x 4 = 8 samples / 8 = 1 s; partition 1: 10 / 16 = 0.625 s.
    assert [c["samples"] for c in record["sim_clients"]] == [8, 10]
    assert [c["sim_s"] for c in record["sim_clients"]] == [1.0, 0.625]
    assert record["sim_round_s"] == 1.0


def test_dropouts_are_not_sent_and_recorded(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, "num_rounds=2", "system=tiers", "system.dropout=0.999",
        "client.local_steps=1",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    assert [m.metadata.message_type for m, _, _ in grid.log].count("train") == 0
    records = read_metrics(run_dir)
    for r in records[1:]:
        assert r["num_clients"] == 0 and r["aggregated"] is False
        assert r["dropped"] == [
            {"partition": 0, "reason": "dropout"},
            {"partition": 1, "reason": "dropout"},
        ]
        assert r["sim_round_s"] == 0.0 and r["clients"] == [0, 1]  # sampled, then dropped
    # Nothing trained: the model stays the initial one.
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    assert all(torch.equal(latest[k].to(t.dtype), t) for k, t in initial.items())


def test_variable_local_work_reaches_the_clients(dataset, tmp_path):
    run_dir = prepared(
        dataset, tmp_path, "system=tiers", "system.local_steps=[1,3]", "client.batch_size=4",
        "seed=4",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    serve(grid, run_dir)
    for m, r, _ in grid.log:
        if m.metadata.message_type != "train":
            continue
        pid = m.metadata.dst_node_id - 1000
        expected = local_steps_for(4, 1, pid, 1, 3)
        assert m.content[C.KEY_CONFIG]["local-epochs"] == 0
        assert m.content[C.KEY_CONFIG]["local-steps"] == expected
        assert r.content[C.KEY_METRICS][C.KEY_STEPS] == expected


# --- report ---------------------------------------------------------------------------------------


def _clocked_run(path, *, seed, deadline, accs, sim):
    path.mkdir(parents=True)
    cfg = {"seed": seed, "system": {"distribution": "tiers", "deadline_s": deadline}}
    (path / C.RUN_CONFIG).write_text(yaml.safe_dump(cfg))
    lines = [{"round": 0, "test_accuracy": accs[0]}]
    lines += [
        {"round": r, "test_accuracy": a, "sim_round_s": s, "sim_time_s": t}
        for r, (a, s, t) in enumerate(zip(accs[1:], sim, _cumsum(sim), strict=True), start=1)
    ]
    (path / C.RUN_METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"test_accuracy_final": accs[-1], "test_accuracy_at_best_val": accs[-1]}
    (path / C.RUN_SUMMARY).write_text(json.dumps(summary))
    write_status(path, "finished")


def _cumsum(xs):
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return out


def test_report_gives_simulated_time_to_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    # deadline 5: rounds of 5, 5, 5 s; 0.5 reached in round 2 (10 s) and round 3 (15 s).
    _clocked_run(sweep / "0", seed=0, deadline=5, accs=[0.1, 0.3, 0.5, 0.6], sim=[5, 5, 5])
    _clocked_run(sweep / "1", seed=1, deadline=5, accs=[0.1, 0.2, 0.4, 0.55], sim=[5, 5, 5])
    # deadline 20: rounds of 20, 12, 20 s; 0.5 reached in round 1 (20 s) and round 2 (32 s).
    _clocked_run(sweep / "2", seed=0, deadline=20, accs=[0.1, 0.5, 0.6, 0.7], sim=[20, 20, 20])
    _clocked_run(sweep / "3", seed=1, deadline=20, accs=[0.1, 0.4, 0.6, 0.7], sim=[20, 12, 20])
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--target", "0.5"]) == 0
    rows = {r["group"]: r for r in csv.DictReader((out / C.REPORT_CSV).open())}
    fast, slow = rows["system.deadline_s=5"], rows["system.deadline_s=20"]
    # (10 + 15) / 2 = 12.5, sample std sqrt(2 * 2.5^2 / 1) = 3.536; total 15 s in both runs.
    assert float(fast["sim_s_to_target_mean"]) == pytest.approx(12.5)
    assert float(fast["sim_s_to_target_std"]) == pytest.approx(math.sqrt(12.5))
    assert float(fast["sim_time_s_mean"]) == pytest.approx(15.0)
    # (20 + 32) / 2 = 26; std sqrt(2 * 6^2) = 8.485; totals 60 and 52: mean 56.
    assert float(slow["sim_s_to_target_mean"]) == pytest.approx(26.0)
    assert float(slow["sim_s_to_target_std"]) == pytest.approx(math.sqrt(72))
    assert float(slow["sim_time_s_mean"]) == pytest.approx(56.0)
    assert int(slow["sim_reached_target"]) == 2
    text = (out / C.REPORT_MD).read_text()
    assert "sim. s to 0.5" in text and "12.5 ± 3.5 (2/2)" in text and "26.0 ± 8.5 (2/2)" in text
    assert (out / C.REPORT_SIM_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A target nobody reaches, and a run without a clock.
    records = [json.loads(x) for x in (sweep / "0" / C.RUN_METRICS).read_text().splitlines()]
    assert sim_time_to_target(records, 0.9) is None
    assert sim_time_to_target(records, 0.1) == 0.0  # the initial model already has it
    assert sim_time_to_target([{"round": 1, "test_accuracy": 0.9}], 0.5) is None


def test_report_without_a_clock_keeps_its_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / C.RUN_CONFIG).write_text(yaml.safe_dump({"seed": 0}))
    (run / C.RUN_METRICS).write_text(json.dumps({"round": 0, "test_accuracy": 0.2}) + "\n")
    (run / C.RUN_SUMMARY).write_text(json.dumps({"test_accuracy_final": 0.2}))
    write_status(run, "finished")
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert "sim. s" not in (out / C.REPORT_MD).read_text()
    assert not (out / C.REPORT_SIM_PLOT).exists()
