"""Runs that never hand back wrong results: one run per directory, torn files, atomic writes,
bad values refused before any work."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_server_loop import prepared

from fedvision import constants as C
from fedvision.atomic import (
    append_jsonl,
    read_jsonl,
    save_torch_atomic,
    write_text_atomic,
    write_with,
)
from fedvision.cli import main as cli_main
from fedvision.errors import FedvisionError
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.report.table import load_run, write_report
from fedvision.rundir import append_resume, claim_run_dir
from tests.grids import InlineGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _snapshot(d):
    """Every file under ``d`` with its bytes and modification time (hidden folders included)."""
    return {
        p.relative_to(d): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in d.rglob("*")
        if p.is_file()
    }


def _old_run(path):
    """A run directory as a finished run leaves it (the files the guard must not touch)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (path / C.RUN_CONFIG).write_text("seed: 0\nclient:\n  lr: 0.02\n")
    (path / C.RUN_METRICS).write_text('{"round": 0, "test_accuracy": 0.1}\n')
    (path / C.CKPT_LATEST).write_bytes(b"weights of run A")
    (path / C.RUN_STATUS).write_text('{"status": "finished"}\n')
    return path


# --- a run directory is written by one run -------------------------------------------------------


def test_a_new_run_into_an_old_runs_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    run_a = _old_run(tmp_path / "A")
    before = _snapshot(run_a)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "seed=2", "client.lr=0.5", f"hydra.run.dir={run_a}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedvision: error: {run_a} already holds a run; continue it with resume={run_a}, "
        "replace it with overwrite=true, or choose another hydra.run.dir"
    ]
    assert _snapshot(run_a) == before  # not a byte, not a timestamp, no new file


def test_overwrite_empties_only_a_run_directory(tmp_path, capsys):
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(FedvisionError, match="empties only a fedvision run directory"):
        claim_run_dir(other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "years of work"
    with pytest.raises(FedvisionError, match="already holds other files"):
        claim_run_dir(other, overwrite=False)

    run_a = _old_run(tmp_path / "A")
    claim_run_dir(run_a, overwrite=True)
    assert run_a.is_dir() and list(run_a.iterdir()) == []
    assert "emptied" in capsys.readouterr().err
    claim_run_dir(tmp_path / "new", overwrite=False)  # a new or empty folder is fine
    claim_run_dir(run_a, overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(FedvisionError, match="is a file"):
        claim_run_dir(tmp_path / "file", overwrite=False)


def test_overwrite_is_refused_in_a_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "-m", "seed=0,1", "overwrite=true", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert exit_info.value.code == 2
    assert "overwrite=true is for one run" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# --- whole files, whole lines --------------------------------------------------------------------


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old\n")

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(path, half_then_fail)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "summary.json"
    ]
    save_torch_atomic(tmp_path / "w.pt", {"x": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["x"], torch.arange(3))


def test_jsonl_appends_are_whole_lines_and_a_torn_last_line_is_dropped(tmp_path, capsys):
    path = tmp_path / C.RUN_METRICS
    for r in range(3):
        append_jsonl(path, {"round": r, "loss": 1.0 / (r + 1)})
    assert path.read_text().count("\n") == 3 and path.read_text().endswith("\n")
    assert [r["round"] for r in read_jsonl(path)] == [0, 1, 2]
    assert capsys.readouterr().err == ""

    text = path.read_text()
    path.write_text(text + text.splitlines()[1][:9])  # a crash inside the fourth append
    assert [r["round"] for r in read_jsonl(path)] == [0, 1, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped a torn last line (9 characters" in err[0]

    path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')  # damage no append makes
    with pytest.raises(FedvisionError, match=r"line 2 is not JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_resume_after_a_crash_inside_a_metrics_append_ends_with_the_uninterrupted_metrics(
    dataset, tmp_path, capsys
):
    # A constant lr: the 1-round run fixes its schedule's horizon at 1 round.
    whole = prepared(dataset, tmp_path / "whole", "num_rounds=2", "client.lr_schedule=constant")
    serve(InlineGrid(whole, 2), whole)
    part = prepared(dataset, tmp_path / "part", "num_rounds=1", "client.lr_schedule=constant")
    serve(InlineGrid(part, 2), part)
    # The server appends round 2's line before it puts round 2's checkpoint in place: a crash
    # inside that append leaves the round-1 checkpoint and a prefix of round 2's line.
    round2 = (whole / C.RUN_METRICS).read_text().splitlines()[2]
    with (part / C.RUN_METRICS).open("a") as f:
        f.write(round2[: len(round2) // 2])
    append_resume(part, 1, {"num_rounds": (1, 2)})
    serve(InlineGrid(part, 2), part)
    assert "dropped a torn last line" in capsys.readouterr().err

    keys = ("round", "test_accuracy", "test_loss", "val_accuracy", "train_loss", "clients")
    got, want = read_metrics(part), read_metrics(whole)
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]
    assert (part / C.RUN_METRICS).read_text().endswith("\n")  # the torn bytes are gone


def test_report_lists_a_damaged_run_and_reports_the_others(dataset, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    good = prepared(dataset, sweep / "0", "num_rounds=1")
    serve(InlineGrid(good, 2), good)
    torn = prepared(dataset, sweep / "1", "num_rounds=1", "seed=1")
    serve(InlineGrid(torn, 2), torn)
    damaged = prepared(dataset, sweep / "2", "num_rounds=1", "seed=2")
    serve(InlineGrid(damaged, 2), damaged)
    with (torn / C.RUN_METRICS).open("a") as f:
        f.write('{"round": 2, "test_acc')  # cut in the middle of its last line
    lines = (damaged / C.RUN_METRICS).read_text().splitlines()
    (damaged / C.RUN_METRICS).write_text(lines[0][:10] + "\n" + "\n".join(lines[1:]) + "\n")

    assert load_run(damaged).status == "unreadable"
    assert load_run(torn).status == "finished" and len(load_run(torn).records) == 2
    text = write_report([sweep], tmp_path / "report")
    assert "| 2 |" in text.split("Not averaged")[0]  # the two readable runs form the group
    assert f"- {damaged}: unreadable (FedvisionError: {damaged / C.RUN_METRICS}: line 1" in text
    assert f"{torn / C.RUN_METRICS}: dropped a torn last line" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fedvision.data.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("reliability") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


# --- bad values: one line, exit 2, no run directory, no Ray -------------------------------------


@pytest.fixture(scope="module")
def one_class_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_class")
    for split in ("train", "val"):
        (root / split / "n01").mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / split / "n01" / "a.JPEG")
    return root


@pytest.fixture(scope="module")
def corrupt_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])  # a copy cut short
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_clients=abc"], "num_clients='abc': takes an integer"),
        (["num_clients=2.5"], "num_clients=2.5: takes an integer"),
        (["data.size=abc"], "data.size='abc': takes an integer"),
        (
            ["privacy=server_fixed", "privacy.wrapper.noise_multiplier=abc"],
            "privacy.wrapper.noise_multiplier='abc': takes a number",
        ),
        (["client.local_bn=maybe"], "client.local_bn='maybe': takes true or false"),
        (["+client.lrr=0.1"], "client.lrr: no such setting (a typo?)"),
        (["client.local_steps=-5"], "client.local_steps=-5 must be >= 1"),
        (["client.local_steps=0"], "client.local_steps=0 must be >= 1"),
        (["system=tiers", "system.dropout=1.0"], "system.dropout=1.0 must lie in [0, 1)"),
        (["data.root=/no/such/folder"], "dataset folder /no/such/folder does not exist"),
        (["data.root={one}", "model.weights=none"], "gives 1 class (n01); a classifier needs"),
        (["model.weights={cut}"], "cannot read checkpoint"),
    ],
)
def test_a_bad_value_is_one_line_exit_2_with_no_run_directory(
    overrides, message, one_class_root, corrupt_weights, tmp_path, capsys
):
    from test_simulation import _no_ray_or_flower_left

    run_dir = tmp_path / "run"
    args = [a.format(one=one_class_root, cut=corrupt_weights) for a in overrides]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", *args, f"hydra.run.dir={run_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedvision: error: ") and message in err[0], err
    assert not run_dir.exists()  # refused before Hydra made the directory
    assert _no_ray_or_flower_left()


def test_a_server_that_a_restarted_one_took_over_writes_nothing_more(dataset, tmp_path):
    """A ServerApp that lost its SuperLink can reconnect to the restarted one and go on with its
    round while the resumed server runs the same round: the older one must stop writing."""
    from fedvision.rundir import claim_server, read_status

    run_dir = prepared(dataset, tmp_path / "run", "num_rounds=3")

    class TakenOverInRound2(InlineGrid):
        trains = 0

        def send_and_receive(self, messages, timeout):
            replies = super().send_and_receive(messages, timeout)
            if any(m.metadata.message_type == "train" for m in messages):
                self.trains += 1
                if self.trains == 2:  # a resumed server claims the run during round 2
                    claim_server(run_dir)
            return replies

    assert serve(TakenOverInRound2(run_dir, 2), run_dir) == {}
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]  # no round-2 line
    assert torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["round"] == 1
    assert not (run_dir / f"{C.CKPT_LATEST}.next").exists()  # nor a round-2 checkpoint
    assert read_status(run_dir) is None  # the status belongs to the newer server


# --- node identity: authentication comes with TLS ----------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from fedvision.runtime.certs import make_certs

    out = tmp_path_factory.mktemp("tls")
    make_certs(out, ["localhost"], node_keys=1)
    return out


def test_a_tls_server_always_authenticates_nodes_and_insecure_turns_both_off(tls):
    from fedvision.runtime.deploy import ServerOptions

    secure = ServerOptions(certs=tls).command()
    assert "--enable-supernode-auth" in secure and "--ssl-certfile" in secure
    insecure = ServerOptions(insecure=True).command()
    assert "--enable-supernode-auth" not in insecure and "--insecure" in insecure
    key = tls / "node-keys" / "node-0.pub"
    with pytest.raises(FedvisionError, match="--register needs node authentication"):
        ServerOptions(insecure=True, register=[key]).check()


def test_a_tls_client_without_a_node_key_is_refused_before_it_starts(tls, capsys, monkeypatch):
    import subprocess

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    args = ["client", "--server", "localhost:9092", "--partition-id", "0"]
    assert cli_main([*args, "--root-certificates", str(tls / "ca.pem")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedvision: error: a client over TLS needs --auth")
    assert started == []  # no SuperNode


def test_an_insecure_client_says_what_it_gives_up(monkeypatch, capsys, tmp_path):
    import signal

    from fedvision.runtime import deploy

    monkeypatch.setattr(deploy, "run_client", lambda opts, _stop: 0)
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = ["client", "--server", "localhost:9092", "--partition-id", "0", "--insecure"]
        assert cli_main(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "WARNING: --insecure: no TLS and no node key" in capsys.readouterr().err


def test_stopping_a_process_group_keeps_every_child_s_exit_status():
    """stop_group collects the zombies of the group it stops and nothing else: a killed
    leader reads as killed (not exit 0), and another child keeps its own status."""
    import signal
    import subprocess
    import sys
    import time

    from fedvision.runtime.deploy import stop_group

    other = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)
    time.sleep(0.5)  # the other child has exited: a zombie until someone waits for it
    stop_group(leader, timeout_s=5.0)
    assert leader.returncode == -signal.SIGTERM
    assert other.wait(timeout=5) == 3
    # By pid, as a script holding no Popen calls it: only the group's zombies are collected.
    other = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    by_pid = subprocess.Popen(["sleep", "30"], start_new_session=True)
    time.sleep(0.5)
    stop_group(by_pid.pid, timeout_s=5.0)
    assert other.wait(timeout=5) == 4
