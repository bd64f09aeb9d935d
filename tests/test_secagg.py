"""SecAgg+ (``secagg=secaggplus``): the aggregate, what the server sees, and the refusals.

The protocol runs in this process: a loopback Grid hands each message to a node's ClientApp with
that node's own Context (as a runtime does) and keeps every reply the server receives. No Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from omegaconf import OmegaConf

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.data.partition import load_partition
from fedvision.errors import FedvisionError
from fedvision.fl import secagg_clientapp
from fedvision.fl.checkpoint import load_checkpoint
from fedvision.fl.secagg import (
    SECAGG_APPS,
    build_workflow,
    check_secagg,
    flower_apps,
    quantisation_bound,
)
from fedvision.fl.secagg_clientapp import clipped_values
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.rundir import load_app, read_plan
from fedvision.runner import check_config, run_experiment
from strategies.sampling import draw_partitions
from strategies.update_fedavg import FedAvgOfUpdates
from tests.grids import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")

SETTINGS = {
    "num_shares": 3,
    "reconstruction_threshold": 2,
    "clipping_range": 1.0,
    "quantization_range": 2**22,
    "modulus_range": 2**32,
    "timeout": None,
}


class FixedUpdate(NumPyClient):
    """Replies a fixed update and example count (the protocol's maths, without training)."""

    def __init__(self, update: np.ndarray, n: int) -> None:
        self.update, self.n = update, n

    def fit(self, parameters, config):
        return [self.update], self.n, {}


def fixed_client_fn(update: np.ndarray, n: int):
    """A ``client_fn`` (Flower inspects its signature) for a FixedUpdate client."""

    def client_fn(context: Context):
        return FixedUpdate(update, n).to_client()

    return client_fn


def masked_vectors(grid: LoopbackGrid) -> dict[int, list[np.ndarray]]:
    """What each client uploaded in the 'collect masked vectors' stage: node -> arrays."""
    out = {}
    for reply in grid.received:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            out[reply.metadata.src_node_id] = masked
    return out


def run_rounds(updates, counts, settings=SETTINGS, max_weight=None, num_rounds=1):
    """One SecAgg+ round over FixedUpdate clients; returns (global after, grid, strategy)."""
    nodes = [11, 12, 13, 14][: len(updates)]
    apps = {}
    for node, u, n in zip(nodes, updates, counts, strict=True):
        apps[node] = ClientApp(client_fn=fixed_client_fn(u, n), mods=[secaggplus_mod])
    grid = LoopbackGrid(apps)
    start = np.zeros_like(updates[0])
    strategy = FedAvgOfUpdates(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(nodes),
        min_evaluate_clients=0, min_available_clients=len(nodes),
        initial_parameters=ndarrays_to_parameters([start]),
    )  # fmt: skip
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
    )
    workflow = build_workflow(settings, max_weight or max(counts), None)
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    after = [a.numpy() for a in record.values()]
    return after[0] - start, grid


def test_the_aggregate_is_fedavg_within_the_hand_computed_quantisation_error():
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, size=500).astype(np.float64) for _ in range(3)]
    counts = [30, 50, 17]  # unequal: the weighting must be folded into the secure sum
    aggregate, _ = run_rounds(updates, counts)
    fedavg = sum(n * u for n, u in zip(counts, updates, strict=True)) / sum(counts)
    # By hand, c = 1, Q = 2^22, max_weight = 50 (the largest count): r = (0.6, 1.0, 0.34).
    # Each weighted value rounds to a step of 2c/Q = 4.77e-7; each r to a step of 1/Q.
    m, c, q = 3, 1.0, 2**22
    ratios = [30 / 50, 50 / 50, 17 / 50]
    dq = [round(r * q) / q for r in ratios]
    max_abs = max(float(np.abs(u).max()) for u in updates)
    bound = (m * 2 * c / q + m * max_abs / q) / sum(dq)
    assert bound == pytest.approx(quantisation_bound(c, q, ratios, max_abs))
    assert bound < 1e-5
    err = np.abs(aggregate - fedavg)
    assert err.max() <= bound
    # Not trivially close: the rounding error is real, a few quantisation steps at most.
    assert err.max() > 0
    # And far from the unweighted mean, which differs from FedAvg by much more than the bound.
    assert np.abs(aggregate - np.mean(updates, axis=0)).max() > 100 * bound


def test_the_server_never_receives_an_individual_update_only_masked_vectors():
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.05, size=400) for _ in range(3)]
    counts = [20, 20, 20]
    aggregate, grid = run_rounds(updates, counts)
    masked = masked_vectors(grid)
    assert sorted(masked) == [11, 12, 13]
    c, q, mod = 1.0, 2**22, 2**32
    for vec in masked.values():
        factor, values = int(vec[0][0]), vec[1]
        # The weight's factor is masked too (true value: round(20/20 * Q) = Q).
        assert factor != q
        # Read as the client's quantised weighted update, the upload is noise across [0, 2^32).
        assert values.min() >= 0 and values.max() < mod
        assert np.mean(values > 2 * q) > 0.9  # a true quantised value lies in [0, Q]
        decoded = values.astype(np.float64) * (2 * c / q) - c
        for u in updates:
            assert np.abs(decoded - u).max() > 1.0  # no upload is (near) any client's update
            assert np.corrcoef(decoded, u)[0, 1] < 0.3
    # Nothing else a client sent carries arrays: the mod empties the legacy FitRes parameters.
    for reply in grid.received:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    # The uploads' sum is still masked by each client's private mask (removed at unmask) ...
    total = sum(v[1].astype(np.int64) for v in masked.values()) % mod
    true_sum = sum(np.round((u + c) * q / (2 * c)) for u in updates)
    assert np.abs(total - true_sum).max() > q
    # ... and the workflow unmasks it to the mean (equal weights here).
    bound = quantisation_bound(c, q, [1.0, 1.0, 1.0], max(np.abs(u).max() for u in updates))
    assert np.abs(aggregate - np.mean(updates, axis=0)).max() <= bound


def seeded_rounds(seed: int, num_rounds: int = 2):
    """Six clients (partition id = 16 - node), three per round, sampled with ``seed``."""
    updates = {node: np.full(8, 0.01 * node) for node in range(11, 17)}
    apps = {}
    for node, u in updates.items():
        apps[node] = ClientApp(client_fn=fixed_client_fn(u, 10), mods=[secaggplus_mod])
    grid = LoopbackGrid(apps)
    strategy = FedAvgOfUpdates(
        seed=seed, fraction_fit=0.5, fraction_evaluate=0.0, min_fit_clients=2,
        min_evaluate_clients=0, min_available_clients=6,
        initial_parameters=ndarrays_to_parameters([np.zeros(8)]),
    )  # fmt: skip
    strategy.set_partitions({node: 16 - node for node in updates})  # the loop's directory says
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=build_workflow(SETTINGS, 10, None))(grid, context)
    uploaded: dict[int, set[int]] = {}  # round -> partitions whose masked vector arrived
    for reply in grid.received:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            rnd = int(reply.metadata.group_id)
            uploaded.setdefault(rnd, set()).add(16 - reply.metadata.src_node_id)
    return uploaded, strategy, context


def test_a_seed_draws_the_same_partitions_every_run_as_the_message_api_does():
    expected = {
        seed: {rnd: set(draw_partitions(range(6), 3, seed, rnd)) for rnd in (1, 2)}
        for seed in (0, 1)
    }
    assert expected[0] != expected[1]  # the two seeds must differ for the test to mean anything
    for seed in (0, 1):
        uploaded, strategy, context = seeded_rounds(seed)
        assert uploaded == expected[seed]
        assert strategy.sampled == sorted(expected[seed][2])  # what the loop records
    # Round 2's aggregate is the mean update of round 2's three clients (node = 16 - pid),
    # added to round 1's: the weights (equal here) and the chosen clients both line up.
    uploaded, _, context = seeded_rounds(0)
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    final = next(iter(record.values())).numpy()
    means = [np.mean([0.01 * (16 - p) for p in uploaded[r]]) for r in (1, 2)]
    np.testing.assert_allclose(final, sum(means), atol=1e-5)


def test_seeded_sampling_waits_a_bounded_time_for_the_clients_then_says_why():
    class TwoOfSix:  # a client manager that never sees more than two nodes
        def num_available(self):
            return 2

        def wait_for(self, num_clients, timeout):
            assert (num_clients, timeout) == (6, 5)
            return False

    strategy = FedAvgOfUpdates(
        seed=0, wait_timeout_s=5, fraction_fit=0.5, min_available_clients=6,
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
    )  # fmt: skip
    with pytest.raises(FedvisionError, match="only 2 of 6 clients connected within 5 s"):
        strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), TwoOfSix())


def test_seeded_sampling_refuses_a_node_whose_partition_it_was_not_told():
    class Three:  # three nodes connected, the directory knows two of them
        def num_available(self):
            return 3

        def wait_for(self, num_clients, timeout):
            return True

        def all(self):
            return {"11": None, "12": None, "13": None}

    strategy = FedAvgOfUpdates(seed=0, fraction_fit=1.0, min_available_clients=3)
    strategy.set_partitions({11: 0, 12: 1})
    with pytest.raises(FedvisionError, match="node 13 holds no known partition"):
        strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), Three())


def test_clipped_values_counts_what_the_mod_will_clip():
    update = np.array([0.5, -2.0, 3.0, 0.1])
    assert clipped_values(update, weight=10, max_weight=10, clipping=1.0) == 2
    assert clipped_values(update, weight=5, max_weight=10, clipping=1.0) == 1  # 3.0 * 0.5 > 1


# --- the config group and its refusals -------------------------------------------------------


def secagg_cfg(*extra: str):
    return compose_config(["secagg=secaggplus", "num_clients=4", *extra])


def test_the_secagg_apps_load_by_name_as_the_runtime_loads_them():
    from flwr.serverapp import ServerApp

    server, client = (load_app(ref) for ref in SECAGG_APPS)
    assert isinstance(server, ServerApp) and isinstance(client, ClientApp)
    assert client is secagg_clientapp.app


def test_the_group_picks_the_second_app_pair_and_none_adds_nothing():
    assert flower_apps(OmegaConf.to_container(secagg_cfg())) == SECAGG_APPS
    plain = OmegaConf.to_container(compose_config([]))
    assert flower_apps(plain) != SECAGG_APPS and not plain["secagg"]
    check_secagg(plain, "deployment")  # secagg=none: nothing to refuse


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["runtime=prepare_only"], "runs on runtime=simulation only"),
        (["strategy=fedprox"], "FedAvg only"),
        (["strategy=scaffold"], "FedAvg only"),
        (["strategy=fednova"], "FedAvg only"),
        (["privacy=server_fixed", "model.finetune=head"], "differential privacy"),
        (["privacy=client_fixed", "model.finetune=head"], "differential privacy"),
        (["privacy=dpsgd"], "differential privacy"),
        (["system=tiers"], "system heterogeneity"),
        (["client.local_bn=true", "strategy.fraction_evaluate=1.0"], "FedBN"),
        (["strategy.fraction_evaluate=0.5"], "evaluates centrally only"),
        (["secagg.num_shares=5"], r"num_shares=5 but a round trains only 4 clients"),
        (["secagg.reconstruction_threshold=5"], "reconstruction_threshold=5 but a round"),
        (["secagg.reconstruction_threshold=3"], "reconstruction_threshold must be less than"),
        (["secagg.num_shares=2"], "num_shares as an integer must be greater than 2"),
        (["strategy.fraction_train=0.25", "strategy.min_train_nodes=1"], "at least 2 clients"),
        (["secagg.quantization_range=1073741824"], "the masked sum would wrap around"),
        (["secagg.modulus_range=6000000000"], "power of 2"),
        (["secagg.clipping_range=0"], "clipping_range=0"),
        (["+secagg.max_weight=10"], "no key 'max_weight'"),
    ],
)
def test_impossible_or_unsupported_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(FedvisionError, match=message):
        check_config(secagg_cfg(*overrides))


def test_the_default_secaggplus_config_passes_its_checks():
    assert check_config(secagg_cfg()).name == "simulation"


# --- the real apps, in process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("secagg") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


def _two_rounds(dataset, *extra: str) -> list[str]:
    """A SecAgg+ run of 2 rounds over 3 clients on the tiny dataset (random weights, 1 step)."""
    return [
        f"data.root={dataset}",
        f"data.classes_file={dataset / 'target_classes.txt'}",
        "data.size=16",
        "data.workers=1",
        "model=shufflenet_v2_x0_5",
        "model.weights=none",
        "num_clients=3",
        "num_rounds=2",
        "partition=iid",
        "client.local_steps=1",
        "client.batch_size=4",
        "progress=false",
        "tracking=none",
        "secagg=secaggplus",
        *extra,
    ]


class StopInRound(LoopbackGrid):
    """A loopback grid whose launcher asks the run to stop as round ``rnd``'s protocol begins."""

    def __init__(self, *args, stop_dir, rnd: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_dir, self.rnd = stop_dir, rnd

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.group_id == str(self.rnd) for m in messages):
            (self.stop_dir / C.RUN_INTERRUPT).write_text("signal\n")
        return super().send_and_receive(messages, timeout)


def _prepared(dataset, run_dir):
    """A prepared SecAgg+ run directory of :func:`_two_rounds`."""
    cfg = compose_config(_two_rounds(dataset, "runtime=prepare_only"))
    # prepare_only is refused for SecAgg+ runs; prepare with secagg off, then switch it on.
    cfg_plain = cfg.copy()
    cfg_plain.secagg = {}
    assert run_experiment(cfg_plain, run_dir) == {"prepared": str(run_dir)}
    (run_dir / C.RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _grid(run_dir, cls=LoopbackGrid, **kwargs):
    """Three nodes (partitions 0-2) running the SecAgg+ ClientApp, each with its own Context."""
    return cls(
        {100 + p: secagg_clientapp.app for p in range(3)},
        node_config={100 + p: {C.KEY_PARTITION_ID: p, C.KEY_NUM_PARTITIONS: 3} for p in range(3)},
        run_config={C.RUN_DIR_KEY: str(run_dir)},
        **kwargs,
    )


def test_the_real_apps_run_two_rounds_and_write_the_usual_outputs(dataset, tmp_path):
    run_dir = tmp_path / "run"
    _prepared(dataset, run_dir)
    grid = _grid(run_dir)
    summary = serve(grid, run_dir)
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["num_clients"] == 3 and r["clients"] == [0, 1, 2] and r["num_failures"] == 0
        assert r["test_accuracy"] is not None and r["val_accuracy"] is not None
        assert r["train_loss"] is not None and "aggregated" not in r
    sizes = [len(t) for t in load_partition(run_dir / C.PARTITION_FILE).train]
    assert summary["secagg"]["max_weight"] == max(sizes)
    assert (run_dir / C.CKPT_LATEST).is_file() and (run_dir / C.CKPT_BEST).is_file()
    num_classes = read_plan(run_dir).num_classes
    ckpt = load_checkpoint(
        run_dir / C.CKPT_LATEST, arch="shufflenet_v2_x0_5", num_classes=num_classes
    )
    assert ckpt.round == 2
    # The model moved, and the server got only masked vectors and plain metrics.
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    moved = [k for k, v in ckpt.model.items() if not torch.equal(v.float(), initial[k].float())]
    assert moved
    assert sorted(masked_vectors(grid)) == [100, 101, 102]
    for reply in grid.received:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())


def test_a_secaggplus_run_stopped_in_round_2_resumes_to_the_uninterrupted_metrics(
    dataset, tmp_path
):
    def untimed(run_dir):
        return [{k: v for k, v in r.items() if k != "round_s"} for r in read_metrics(run_dir)]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for run_dir in (whole, cut):
        _prepared(dataset, run_dir)
    # SecAgg+'s stochastic quantisation draws from numpy's global generator (restored on resume).
    np.random.seed(0)
    serve(_grid(whole), whole)
    np.random.seed(0)
    serve(_grid(cut, StopInRound, stop_dir=cut, rnd=2), cut)
    status = json.loads((cut / C.RUN_STATUS).read_text())
    assert (status["status"], status["round"]) == ("interrupted", 1)
    assert [r["round"] for r in read_metrics(cut)] == [0, 1]
    (cut / C.RUN_INTERRUPT).unlink()  # what `fedvision run resume=...` clears
    serve(_grid(cut), cut)  # a new Flower run: fresh node Contexts, the protocol from scratch
    assert json.loads((cut / C.RUN_STATUS).read_text())["status"] == "finished"
    assert untimed(cut) == untimed(whole)
    for name in (C.CKPT_LATEST, C.CKPT_BEST):
        a, b = (torch.load(d / name, weights_only=False)["model"] for d in (whole, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_secaggplus_run_in_the_ray_simulation_loads_the_pair_its_plan_names(dataset, tmp_path):
    from test_simulation import _no_ray_or_flower_left

    from fedvision.rundir import read_plan

    run_dir = tmp_path / "run"
    cfg = compose_config(_two_rounds(dataset))
    run_experiment(cfg, run_dir)
    plan = read_plan(run_dir)
    assert (plan.server_app, plan.client_app) == SECAGG_APPS  # the runtime loads these
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all("secagg_clipped" in r for r in records[1:])  # only the SecAgg+ pair records it
    assert _no_ray_or_flower_left()
