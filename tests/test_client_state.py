"""A client's state between rounds (SCAFFOLD's c_i, FedBN's BatchNorm) survives a resume.

The store's rules are checked on files; then whole runs are served in this process
(``tests.grids.LoopbackGrid``, every message through Flower's protobuf): a run stopped after its
clients trained in round 3 and resumed on fresh nodes (new Contexts, as a new simulation has)
must end with the uninterrupted run's global model, bit for bit. With the state in the Contexts
(what a deployment keeps) the same resume loses it, and the models differ: that is what the
files are for.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.errors import FedvisionError
from fedvision.fl import clientapp, cohort_clientapp
from fedvision.fl.client_state import ClientStates, FileState, client_state
from fedvision.fl.cohort import COHORT_CLIENT_APP
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.rundir import read_plan, write_plan
from fedvision.runner import run_experiment
from tests.grids import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _record(value: float, n: int = 3) -> ArrayRecord:
    return ArrayRecord({C.KEY_FLAT: Array(np.full(n, value, dtype=np.float32))})


def _value(record: ArrayRecord | None) -> float | None:
    return None if record is None else float(record[C.KEY_FLAT].numpy()[0])


# --- the store --------------------------------------------------------------------------------


def test_a_train_message_reads_earlier_rounds_and_an_evaluate_message_its_own(tmp_path):
    for rnd in (1, 3):
        FileState(tmp_path, 4, rnd, rnd)["k"] = _record(float(rnd))
    assert _value(FileState(tmp_path, 4, 1, 1).get("k")) is None  # round 1 trains from none
    assert _value(FileState(tmp_path, 4, 3, 3).get("k")) == 1.0  # round 3 trains from round 1
    assert _value(FileState(tmp_path, 4, 4, 3).get("k")) == 3.0  # round 3 evaluates its own
    assert _value(FileState(tmp_path, 5, 9, 9).get("k")) is None  # another client: nothing
    assert FileState(tmp_path, 4, 9, 9).get("other") is None
    # dtypes and names come back as stored
    rec = ArrayRecord(
        {"a.weight": Array(np.arange(4, dtype=np.float64)), "n": Array(np.array(7, np.int64))}
    )
    FileState(tmp_path, 0, 2, 2)["bn"] = rec
    back = FileState(tmp_path, 0, 3, 3).get("bn")
    assert list(back.keys()) == ["a.weight", "n"]
    assert back["a.weight"].numpy().dtype == np.float64 and int(back["n"].numpy()) == 7


def test_the_server_keeps_the_files_in_step_with_its_checkpoints(tmp_path):
    states = ClientStates(tmp_path / "cs")
    for pid, rounds in ((0, (1, 2, 3)), (1, (1, 2))):
        for rnd in rounds:
            FileState(states.folder, pid, rnd, rnd)["k"] = _record(float(rnd))
    (states.folder / "1" / "k.3.npz.tmp").write_bytes(b"half")  # a write the stop cut short
    states.keep_newest([0])  # after a checkpoint: the round's clients keep their newest
    assert sorted(p.name for p in (states.folder / "0").iterdir()) == ["k.3.npz"]
    assert len(list((states.folder / "1").iterdir())) == 3  # not in that round: untouched
    states.start(2)  # resumed from round 2: round 3 never happened
    assert list((states.folder / "0").iterdir()) == []
    assert sorted(p.name for p in (states.folder / "1").iterdir()) == ["k.1.npz", "k.2.npz"]
    states.start(None)  # a new run starts with no state
    assert not states.folder.exists()


def test_a_damaged_state_file_is_one_clear_error(tmp_path):
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "k.1.npz").write_bytes(b"not a zip")
    with pytest.raises(FedvisionError, match=r"client state .*k\.1\.npz does not read.*remove it"):
        FileState(tmp_path, 2, 5, 5).get("k")


def test_without_a_folder_in_the_round_config_the_context_keeps_the_state(tmp_path):
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store = client_state({C.KEY_SERVER_ROUND: 2}, ctx, 0)
    store["k"] = _record(1.0)
    assert _value(ctx.state.get("k")) == 1.0 and not list(tmp_path.iterdir())
    files = client_state({C.KEY_SERVER_ROUND: 2, C.KEY_CLIENT_STATE: str(tmp_path)}, ctx, 0)
    files["k"] = _record(2.0)
    assert (tmp_path / "0" / "k.2.npz").is_file()


# --- whole runs --------------------------------------------------------------------------------


class StopsAfterTraining(LoopbackGrid):
    """A LoopbackGrid whose server process "dies" once its clients trained in ``stop_round``."""

    def __init__(self, *args, stop_round: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_round = stop_round

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        first = messages[0] if messages else None
        if (
            first is not None
            and first.metadata.message_type == "train"
            and int(first.content[C.KEY_CONFIG][C.KEY_SERVER_ROUND]) == self.stop_round
        ):
            raise KeyboardInterrupt  # the clients wrote their round; the server never saw it
        return replies


def _prepare(dataset, run_dir, extra, *, files: bool, workers: int = 0):
    cfg = compose_config(
        [
            "experiment=quick",
            f"data.root={dataset}",
            f"data.classes_file={dataset / 'target_classes.txt'}",
            "data.workers=1",
            "num_clients=3",
            "num_rounds=4",
            "partition=iid",
            "client.local_steps=2",
            "client.batch_size=4",
            "client.augment=none",
            "progress=false",
            "tracking=none",
            "runtime=prepare_only",
            *extra,
        ]
    )
    assert run_experiment(cfg, run_dir) == {"prepared": str(run_dir)}
    plan = read_plan(run_dir)
    # What runtime=simulation writes (its clients see the run directory), or a deployment's none.
    folder = str(run_dir / C.CLIENT_STATE_DIR) if files else None
    if workers:
        plan = dataclasses.replace(plan, cohort_workers=workers, client_app=COHORT_CLIENT_APP)
    write_plan(run_dir, dataclasses.replace(plan, client_state_dir=folder))


def _grid(run_dir, workers: int = 0, stop_round: int | None = None) -> StopsAfterTraining:
    nodes = workers or 3
    app = cohort_clientapp.app if workers else clientapp.app
    return StopsAfterTraining(
        {700 + i: app for i in range(nodes)},
        node_config={
            700 + i: {C.KEY_PARTITION_ID: i, C.KEY_NUM_PARTITIONS: nodes} for i in range(nodes)
        },
        run_config={C.RUN_DIR_KEY: str(run_dir)},
        stop_round=stop_round,
    )


def _final(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stopped_and_resumed(dataset, run_dir, extra, *, files: bool, workers: int = 0):
    _prepare(dataset, run_dir, extra, files=files, workers=workers)
    with pytest.raises(KeyboardInterrupt):
        serve(_grid(run_dir, workers, stop_round=3), run_dir)
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "failed"
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    serve(_grid(run_dir, workers), run_dir)  # resumed from round 2 on fresh nodes
    assert json.loads((run_dir / C.RUN_STATUS).read_text())["status"] == "finished"
    return _final(run_dir)


# SCAFFOLD samples 2 of 3 clients a round: a client's c_i waits over the rounds it sits out.
SCAFFOLD = [
    "model=simple_cnn", "data.size=32", "strategy=scaffold", "client.momentum=0.0",
    "strategy.fraction_train=0.67",
]  # fmt: skip
FEDBN = [
    "model=resnet18", "data.size=16", "client.local_bn=true", "strategy.fraction_train=1.0",
    "strategy.fraction_evaluate=1.0",
    "strategy.min_evaluate_nodes=1", "partition.val_fraction=0.3", "client.local_steps=1",
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "workers"),
    [(SCAFFOLD, 0), (SCAFFOLD, 2), (FEDBN, 0)],
    ids=["scaffold", "scaffold-cohorts", "fedbn"],
)
def test_a_resumed_run_continues_each_clients_state_and_ends_where_an_uninterrupted_one_does(
    generated_dataset, tmp_path, extra, workers
):
    whole = tmp_path / "whole"
    _prepare(generated_dataset, whole, extra, files=True, workers=workers)
    serve(_grid(whole, workers), whole)
    resumed = _stopped_and_resumed(
        generated_dataset, tmp_path / "resumed", extra, files=True, workers=workers
    )
    assert _same(resumed, _final(whole))
    a, b = read_metrics(whole), read_metrics(tmp_path / "resumed")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    if "client.local_bn=true" in extra:  # every client's BatchNorm is new once, resumed or not
        assert [r["clients_new_bn"] for r in b[1:]] == [3, 0, 0, 0]
        assert [r.get("client_val_accuracy") for r in a] == [
            r.get("client_val_accuracy") for r in b
        ]
    # After the last checkpoint each client keeps one file per key: its newest.
    kept = sorted(
        p.relative_to(whole / C.CLIENT_STATE_DIR).as_posix()
        for p in (whole / C.CLIENT_STATE_DIR).rglob("*.npz")
    )
    key = C.STATE_LOCAL_BN if "client.local_bn=true" in extra else C.STATE_CONTROL
    trained = {
        p: max(r["round"] for r in a[1:] if p in r["clients"]) for r in a[1:] for p in r["clients"]
    }
    assert kept == sorted(f"{p}/{key}.{rnd}.npz" for p, rnd in trained.items())


@pytest.mark.parametrize("extra", [SCAFFOLD, FEDBN], ids=["scaffold", "fedbn"])
def test_with_the_state_in_contexts_a_resume_loses_it_and_the_model_differs(
    generated_dataset, tmp_path, extra, capsys
):
    whole = tmp_path / "whole"
    _prepare(generated_dataset, whole, extra, files=False)
    serve(_grid(whole), whole)
    resumed = _stopped_and_resumed(generated_dataset, tmp_path / "resumed", extra, files=False)
    assert not _same(resumed, _final(whole))
    assert not (tmp_path / "resumed" / C.CLIENT_STATE_DIR).exists()
    if "client.local_bn=true" in extra:
        assert "FedBN resumes with every client's BatchNorm back" in capsys.readouterr().err
        assert [r["clients_new_bn"] for r in read_metrics(tmp_path / "resumed")[1:]] == [3, 0, 3, 0]


@pytest.mark.parametrize(
    ("runtime", "files"),
    [("simulation", True), ("deployment", False), ("prepare_only", False)],
)
def test_the_plan_names_the_folder_where_every_client_sees_the_run_directory(
    generated_dataset, tmp_path, runtime, files
):
    from fedvision.runner import _prepare_run_dir, build_runtime

    cfg = compose_config(
        [
            "experiment=quick", f"data.root={generated_dataset}", "data.workers=1",
            f"data.classes_file={generated_dataset / 'target_classes.txt'}", "data.size=32",
            "model=simple_cnn",
            "progress=false", "tracking=none", "num_clients=2", "partition=iid",
            f"runtime={runtime}", *(["runtime.insecure=true"] if runtime == "deployment" else []),
        ]
    )  # fmt: skip
    _prepare_run_dir(cfg, tmp_path, build_runtime(cfg), None)  # prepared, nothing started
    want = str((tmp_path / C.CLIENT_STATE_DIR).resolve()) if files else None
    assert read_plan(tmp_path).client_state_dir == want


class DropsTheFolder(LoopbackGrid):
    """A server of an older fedvision: its round configs name no client-state folder."""

    def send_and_receive(self, messages, timeout=None):
        for m in messages:
            if C.KEY_CONFIG in m.content.config_records:
                m.content[C.KEY_CONFIG].pop(C.KEY_CLIENT_STATE, None)
        return super().send_and_receive(messages, timeout)


def test_a_cohort_worker_refuses_scaffold_without_the_folder_instead_of_mixing_its_clients(
    generated_dataset, tmp_path
):
    _prepare(generated_dataset, tmp_path, SCAFFOLD, files=True, workers=2)
    grid = DropsTheFolder(
        {700 + i: cohort_clientapp.app for i in range(2)},
        node_config={700 + i: {C.KEY_PARTITION_ID: i, C.KEY_NUM_PARTITIONS: 2} for i in range(2)},
        run_config={C.RUN_DIR_KEY: str(tmp_path)},
    )
    with pytest.raises(FedvisionError, match="SCAFFOLD in cohorts needs the client-state folder"):
        serve(grid, tmp_path)
    status = json.loads((tmp_path / C.RUN_STATUS).read_text())
    assert "needs the client-state folder" in status["error"], status
    assert not (tmp_path / C.CLIENT_STATE_DIR).exists() or not any(
        (tmp_path / C.CLIENT_STATE_DIR).rglob("*.npz")
    )
