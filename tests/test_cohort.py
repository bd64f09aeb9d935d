"""Cohort execution (``runtime.cohort_workers``): the same global model as one node per client.

Both runs are served in this process: the per-client run by fedvision's ClientApp on one node
per partition, the cohort run by the cohort ClientApp on two worker nodes, every message
serialised to Flower's protobuf and back (``tests.grids.LoopbackGrid``). No Ray.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.partition import load_partition
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp, cohort_clientapp
from fedvision.fl.cohort import COHORT_CLIENT_APP, check_cohort, split_cohorts
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.rundir import read_node_events, read_plan, write_plan
from fedvision.runner import check_config, run_experiment
from strategies.sampling import draw_partitions
from tests.grids import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")

NUM_CLIENTS, WORKERS = 6, 2


def _overrides(dataset, *extra: str) -> list[str]:
    """6 clients, 3 sampled a round, 3 rounds of NIID-Bench's small CNN on the tiny dataset."""
    return [
        "experiment=quick",
        f"data.root={dataset}",
        f"data.classes_file={dataset / 'target_classes.txt'}",
        "data.size=32",
        "data.workers=1",
        "model=simple_cnn",
        f"num_clients={NUM_CLIENTS}",
        "num_rounds=3",
        "partition=dirichlet",
        "partition.min_size=2",
        "strategy.fraction_train=0.5",
        "client.local_steps=3",
        "client.batch_size=4",
        "progress=false",
        "tracking=none",
        "runtime=prepare_only",
        *extra,
    ]


def _prepare(dataset, run_dir, *extra: str, workers: int = 0) -> None:
    assert run_experiment(compose_config(_overrides(dataset, *extra)), run_dir) == {
        "prepared": str(run_dir)
    }
    if workers:  # what `runtime.cohort_workers=2` writes into the plan of a simulation run
        plan = read_plan(run_dir)
        write_plan(
            run_dir,
            dataclasses.replace(
                plan, cohort_workers=workers, client_app=COHORT_CLIENT_APP,
                client_state_dir=str(run_dir / C.CLIENT_STATE_DIR),
            ),
        )  # fmt: skip


def _grid(run_dir, app, nodes: int) -> LoopbackGrid:
    """``nodes`` nodes running ``app``, node i holding partition (or worker index) i."""
    return LoopbackGrid(
        {500 + i: app for i in range(nodes)},
        node_config={
            500 + i: {C.KEY_PARTITION_ID: i, C.KEY_NUM_PARTITIONS: nodes} for i in range(nodes)
        },
        run_config={C.RUN_DIR_KEY: str(run_dir)},
    )


def _final(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / C.CKPT_LATEST, weights_only=False)["model"]


@pytest.mark.parametrize(
    "strategy",
    [
        [],
        ["strategy=fedprox", "strategy.proximal_mu=0.1"],
        ["strategy=fedadam"],
        # Unequal work (steps of whole epochs over unequal partitions) and momentum: FedNova's
        # normalisation differs from FedAvg's mean here (a worker that replied the plain mean
        # fails this test).
        ["strategy=fednova", "client.local_steps=null", "client.local_epochs=1"],
        # Every client's c_i carried from round to round (clients are sampled again), the plain
        # means of models and control changes: a worker that kept no c_i fails this test.
        ["strategy=scaffold", "client.momentum=0.0"],
    ],
    ids=["fedavg", "fedprox", "fedadam", "fednova", "scaffold"],
)
def test_a_cohort_run_gives_the_per_client_runs_global_model(generated_dataset, tmp_path, strategy):
    per_client, cohorts = tmp_path / "per_client", tmp_path / "cohorts"
    _prepare(generated_dataset, per_client, *strategy)
    _prepare(generated_dataset, cohorts, *strategy, workers=WORKERS)
    serve(_grid(per_client, clientapp.app, NUM_CLIENTS), per_client)
    grid = _grid(cohorts, cohort_clientapp.app, WORKERS)
    serve(grid, cohorts)
    for run_dir in (per_client, cohorts):
        assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    a, b = read_metrics(per_client), read_metrics(cohorts)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for x, y in zip(a[1:], b[1:], strict=True):
        # The same seeded sample, each client trained once, its example count kept.
        assert x["clients"] == y["clients"] and len(y["clients"]) == 3
        assert x["num_clients"] == y["num_clients"] == 3 and y["num_failures"] == 0
        assert y["cohorts"] == WORKERS  # three clients in two cohorts: two messages
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
        assert y["update_norm_median"] == pytest.approx(x["update_norm_median"], rel=1e-5)
        assert y["test_loss"] == pytest.approx(x["test_loss"], rel=1e-4)
    # Tolerance: the cohort sums its clients in float64 and sends a float32 mean, so the
    # summation order (and one rounding) differs from FedAvg over three float32 replies.
    wa, wb = _final(per_client), _final(cohorts)
    moved = 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
        moved += not torch.equal(wa[k], torch.load(per_client / C.RUN_INITIAL)[k])
    assert moved  # the model did train
    if "strategy=scaffold" in strategy:  # each trained client's newest c_i, in the run dir
        folder = cohorts / C.CLIENT_STATE_DIR
        newest = {p: r["round"] for r in b[1:] for p in r["clients"]}
        assert sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*.npz")) == sorted(
            f"{p}/{C.STATE_CONTROL}.{rnd}.npz" for p, rnd in newest.items()
        )
    # Two messages went out a round instead of three, each with the whole cohort's list.
    sent = [m for m in grid.received if C.KEY_COHORT_REPORT in m.content.config_records]
    assert len(sent) == 3 * WORKERS


@pytest.mark.parametrize("mode", ["client_fixed", "server_fixed"])
def test_client_level_dp_in_cohorts_clips_each_client_and_gives_the_per_client_model(
    generated_dataset, tmp_path, monkeypatch, mode
):
    """Each client clipped before the worker sums, each weighing 1, the same noise after."""
    from flwr.serverapp.strategy import dp_fixed_clipping

    dp = [f"privacy={mode}", "privacy.wrapper.clipping_norm=0.05"]
    dp += ["privacy.wrapper.noise_multiplier=0.5"]
    per_client, cohorts = tmp_path / "per_client", tmp_path / "cohorts"
    _prepare(generated_dataset, per_client, *dp)
    _prepare(generated_dataset, cohorts, *dp, workers=WORKERS)
    stds: list[float] = []
    for run_dir, app, nodes in (
        (per_client, clientapp.app, NUM_CLIENTS), (cohorts, cohort_clientapp.app, WORKERS)
    ):  # fmt: skip
        # Flower draws the noise from numpy's global generator, which the in-process clients
        # here share: each run gets the same stream of its own, and every std is recorded.
        rng = np.random.default_rng(0)

        def noise(arrays, std, rng=rng):
            stds.append(std)
            for a in arrays:
                a += rng.normal(0, std, a.shape).astype(a.dtype)

        monkeypatch.setattr(dp_fixed_clipping, "add_gaussian_noise_inplace", noise)
        serve(_grid(run_dir, app, nodes), run_dir)
    # z * C / m for the 3 sampled clients, every round of both runs.
    assert stds == pytest.approx([0.5 * 0.05 / 3] * 6, rel=1e-12)
    a, b = read_metrics(per_client), read_metrics(cohorts)
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x["clients"] == y["clients"] and y["num_clients"] == 3
        # Equal weights: the plain mean of the clients' losses, not the example-weighted one.
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
        assert y["update_norm_median"] == pytest.approx(x["update_norm_median"], rel=1e-5)
        assert y["epsilon"] == pytest.approx(x["epsilon"], rel=1e-9)
        assert y["dp_noise_multiplier"] == x["dp_noise_multiplier"] == 0.5
        if mode == "client_fixed":  # what the server receives is clipped: at most C
            assert y["update_norm_max"] <= 0.05 * (1 + 1e-5)
        else:
            assert y["clipped_fraction"] == x["clipped_fraction"]
    if mode == "server_fixed":
        assert b[1]["clipped_fraction"] > 0  # round 1's updates are above C: clipping matters
    assert b[-1]["epsilon"] > b[1]["epsilon"] > 0
    wa, wb = _final(per_client), _final(cohorts)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "system",
    [
        ["system.deadline_s=1.0", "system.dropout=0.3"],  # late and dropped-out clients
        ["system.deadline_s=0.3", "system.deadline_policy=partial"],  # steps that fit
        ["system.local_steps=[1,4]"],  # each client's own number of steps
    ],
    ids=["drop", "partial", "variable-steps"],
)
def test_simulated_devices_in_cohorts_give_the_per_client_runs_clock_and_model(
    generated_dataset, tmp_path, system
):
    """The same dropouts, step caps, late clients, simulated clock and global model."""
    devices = ["system=tiers", "system.down_mb_s=null", "system.up_mb_s=null", *system]
    per_client, cohorts = tmp_path / "per_client", tmp_path / "cohorts"
    _prepare(generated_dataset, per_client, *devices, "num_rounds=4")
    _prepare(generated_dataset, cohorts, *devices, "num_rounds=4", workers=WORKERS)
    serve(_grid(per_client, clientapp.app, NUM_CLIENTS), per_client)
    serve(_grid(cohorts, cohort_clientapp.app, WORKERS), cohorts)
    a, b = read_metrics(per_client), read_metrics(cohorts)
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4]
    keys = ("clients", "num_clients", "num_dropped", "dropped", "sim_clients", "sim_time_s")
    for x, y in zip(a[1:], b[1:], strict=True):
        assert {k: y.get(k) for k in keys} == {k: x.get(k) for k in keys}
        if x.get("train_loss") is not None:
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
    # The settings do what they say here: clients drop out or are late, or their work differs.
    reasons = {d["reason"] for r in b[1:] for d in r.get("dropped", [])}
    steps = {c["steps"] for r in b[1:] for c in r["sim_clients"]}
    if "system.dropout=0.3" in system:
        assert reasons == {"dropout", "deadline"}
    else:
        assert len(steps) > 1
    wa, wb = _final(per_client), _final(cohorts)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_a_worker_clips_each_update_to_the_norm_and_weighs_its_clients_equally(
    generated_dataset, tmp_path
):
    """One cohort, one round, by hand: the reply is the plain mean of the clipped updates."""
    run_dir = tmp_path / "run"
    dp = ["privacy=client_fixed", "privacy.wrapper.clipping_norm=0.01", "num_rounds=1"]
    _prepare(generated_dataset, run_dir, *dp, "privacy.wrapper.noise_multiplier=0.0", workers=1)
    grid = _grid(run_dir, cohort_clientapp.app, 1)
    serve(grid, run_dir)
    reply = next(m for m in grid.received if C.KEY_COHORT_REPORT in m.content.config_records)
    report = reply.content.config_records[C.KEY_COHORT_REPORT]
    metrics = reply.content.metric_records[C.KEY_METRICS]
    assert metrics[C.KEY_NUM_EXAMPLES] == len(report[C.KEY_COHORT_DONE]) == 3
    assert metrics[C.KEY_NUM_TRAIN] == sum(report[C.KEY_COHORT_NUM_TRAIN])
    losses = list(report[C.KEY_COHORT_LOSSES])
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(sum(losses) / 3, rel=1e-9)
    # The mean of three updates each clipped to 0.01 (every raw norm here is above it).
    norms = list(report[C.KEY_COHORT_NORMS])
    assert min(norms) > 0.01
    start = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    end = _final(run_dir)
    moved = torch.cat([(end[k] - start[k]).reshape(-1) for k in start])
    assert 0 < float(torch.linalg.vector_norm(moved)) <= 0.01 * (1 + 1e-5)


def test_a_failing_client_is_recorded_and_the_rest_of_its_cohort_counts(
    generated_dataset, tmp_path, monkeypatch
):
    seed = int(compose_config(_overrides(generated_dataset)).seed)
    bad = draw_partitions(range(NUM_CLIENTS), 3, seed, 1)[0]  # round 1's first client
    real = cohort_clientapp.client_indices

    def flaky(node):
        if int(node[C.KEY_PARTITION_ID]) == bad:
            raise RuntimeError("CUDA out of memory (staged)")
        return real(node)

    monkeypatch.setattr(cohort_clientapp, "client_indices", flaky)
    run_dir = tmp_path / "run"
    _prepare(generated_dataset, run_dir, workers=WORKERS)
    serve(_grid(run_dir, cohort_clientapp.app, WORKERS), run_dir)
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    records = read_metrics(run_dir)[1:]
    assert bad in records[0]["clients"]
    for r in records:
        if bad in r["clients"]:
            assert r["num_failures"] == 1 and r["num_clients"] == len(r["clients"]) - 1
            reason = "RuntimeError: CUDA out of memory (staged)"
            assert r["failures"] == [{"partition": bad, "code": None, "reason": reason}]
            assert "aggregated" not in r  # the other clients of its cohort still count
        else:
            assert r["num_failures"] == 0


def test_cohorts_split_the_sample_by_examples_largest_first():
    sizes = [50, 10, 30, 30, 5, 40]
    # By hand: 50 -> w0; 40 -> w1; 30 (p2) -> w1 (40 < 50); 30 (p3) -> w0 (50 < 70);
    # 10 -> w1 (70 < 80); 5 -> w0 (80 = 80: the lower index). Loads 85 and 80.
    assert split_cohorts(range(6), sizes, 2) == [[0, 3, 4], [1, 2, 5]]
    assert split_cohorts([4], sizes, 3) == [[4], [], []]  # an idle worker gets no message
    assert split_cohorts([], sizes, 2) == [[], []]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=krum"], "aggregates means of the clients"),
        (["strategy=fedmedian"], "aggregates means of the clients"),
        (["privacy=client_adaptive", "model.finetune=head"], "fixed clipping norm only"),
        (["privacy=server_adaptive", "model.finetune=head"], "fixed clipping norm only"),
        (["privacy=dpsgd"], "does not run DP-SGD"),
        (["secagg=secaggplus", "num_clients=4"], "does not run SecAgg+"),
        (["client.local_bn=true", "strategy.fraction_evaluate=1.0"], "does not run FedBN"),
        (["strategy.fraction_evaluate=0.5"], "evaluates centrally only"),
        (["runtime.cohort_workers=-1"], "must be >= 0"),
    ],
)
def test_what_a_cohort_cannot_stand_in_for_is_refused_before_any_work(overrides, message):
    cfg = compose_config(["runtime.cohort_workers=2", *overrides])
    with pytest.raises(FedvisionError, match=message):
        check_config(cfg)


def test_cohort_mode_is_refused_outside_the_simulation():
    with pytest.raises(FedvisionError, match="a simulation mode, not runtime=x"):
        check_cohort(OmegaConf.to_container(compose_config(["runtime.cohort_workers=2"])), "x")


def test_the_default_is_one_node_per_client_and_a_cohort_config_passes():
    assert compose_config([]).runtime.cohort_workers == 0
    assert check_config(compose_config(["runtime.cohort_workers=2"])).cohort_workers == 2
    for mode in ("client_fixed", "server_fixed"):
        dp = compose_config(["runtime.cohort_workers=2", f"privacy={mode}", "model.finetune=head"])
        assert check_config(dp).cohort_workers == 2


def test_the_worker_averages_its_clients_by_example_count(generated_dataset, tmp_path):
    """A cohort of one client replies what that client alone would: the mean of one."""
    run_dir = tmp_path / "run"
    _prepare(generated_dataset, run_dir, "num_rounds=1", workers=1)
    grid = _grid(run_dir, cohort_clientapp.app, 1)
    serve(grid, run_dir)
    report = next(
        m.content.config_records[C.KEY_COHORT_REPORT]
        for m in grid.received
        if C.KEY_COHORT_REPORT in m.content.config_records
    )
    counts = list(report[C.KEY_COHORT_NUM_TRAIN])
    losses = list(report[C.KEY_COHORT_LOSSES])
    record = read_metrics(run_dir)[1]
    assert list(report[C.KEY_COHORT_DONE]) == record["clients"]
    assert record["train_loss"] == pytest.approx(np.dot(counts, losses) / sum(counts), rel=1e-9)


def test_a_cohort_run_in_the_ray_simulation_trains_every_sampled_client_on_two_workers(
    generated_dataset, tmp_path
):
    from test_simulation import _no_ray_or_flower_left

    run_dir = tmp_path / "run"
    extra = ["runtime=simulation", "runtime.cohort_workers=2", "num_rounds=2"]
    base = [o for o in _overrides(generated_dataset) if o != "runtime=prepare_only"]
    run_experiment(compose_config([*base, *extra]), run_dir)
    plan = read_plan(run_dir)
    assert (plan.cohort_workers, plan.client_app) == (2, COHORT_CLIENT_APP)
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    held = [e["partition"] for e in read_node_events(run_dir) if e["event"] == "holds"]
    assert sorted(held) == [0, 1]  # two worker nodes, not one per partition
    for r in read_metrics(run_dir)[1:]:
        assert r["num_clients"] == len(r["clients"]) == 3 and r["cohorts"] == 2
    assert _no_ray_or_flower_left()


@pytest.mark.realdata
def test_ten_thousand_cifar10_clients_train_100_a_round_in_two_messages(tmp_path):
    """10,000 clients (CIFAR-10, Dirichlet 0.3), 100 a round: the round touches the sample only.

    The per-round work of the server and the messages must not grow with the population: each
    round sends two cohort messages of one model each, whatever the number of clients (a run of
    1,000 clients sends the same bytes). Time and memory are measured by
    ``scripts/bench_cross_device.py --clients 10000``, not asserted here.
    """
    from fedvision.paths import shared_data_dir

    cifar = shared_data_dir() / "cifar10"
    if not (cifar / "train").is_dir():
        pytest.skip(f"{cifar} is absent (shared data: $FEDVISION_SHARED_DATA)")
    bytes_down = {}
    for population in (1_000, 10_000):
        run_dir = tmp_path / str(population)
        overrides = [
            f"data.root={cifar}", "data.size=32", "data.workers=2", "model=simple_cnn",
            f"num_clients={population}", "num_rounds=3", "partition=dirichlet",
            "partition.alpha=0.3", "partition.min_size=0", "partition.val_fraction=0.0",
            f"strategy.fraction_train={100 / population}", "strategy.min_train_nodes=100",
            "client.local_epochs=1", "client.batch_size=10", "client.augment=none",
            "eval_every=3", "progress=false", "tracking=none", "runtime=prepare_only",
        ]  # fmt: skip
        assert run_experiment(compose_config(overrides), run_dir) == {"prepared": str(run_dir)}
        plan = read_plan(run_dir)
        write_plan(run_dir, dataclasses.replace(plan, cohort_workers=2))
        serve(_grid(run_dir, cohort_clientapp.app, 2), run_dir)
        assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
        records = read_metrics(run_dir)[1:]
        sizes = [len(t) for t in load_partition(run_dir / C.PARTITION_FILE).train]
        for r in records:
            assert len(set(r["clients"])) == 100 and r["cohorts"] == 2
            # Clients Dirichlet left without an image train nothing: recorded, not aggregated.
            empty = sum(sizes[p] == 0 for p in r["clients"])
            assert r["num_clients"] + r["num_failures"] == 100 and r["num_failures"] <= empty
        bytes_down[population] = {r["bytes_down"] for r in records}
    assert bytes_down[1_000] == bytes_down[10_000] and len(bytes_down[1_000]) == 1
    assert records[-1]["test_accuracy"] is not None
