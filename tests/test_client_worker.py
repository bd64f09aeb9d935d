"""The warm task worker survives what a server restart does to its tasks (no processes started).

After a SuperLink restart, a client may hold a task of the run that died with the old server.
The SuperNode then refuses the task's token (HTTP 401/403) and its heartbeats. Flower's own
helpers answer both by raising SIGINT in their process, which for this long-lived worker meant
stopping the whole client: the restarted run then waited in vain for it (CI, 2026-11-28).
"""

from __future__ import annotations

import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from fedvision.runtime import client_worker
from fedvision.runtime.client_worker import TaskWithdrawn, _retry_invoker, _task_heartbeat_fn


@pytest.fixture
def sigints(monkeypatch):
    """Every SIGINT this process raises while the test runs, instead of the default handler."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGINT, previous)


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:9094/v1/runtime/pull-messages")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code))


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_task_token_ends_the_task_not_the_process(code, sigints):
    calls = []

    def refused():
        calls.append(1)
        raise _status_error(code)

    with pytest.raises(TaskWithdrawn, match=str(code)):
        _retry_invoker().invoke(refused)
    assert calls == [1]  # no retries of a refused token
    assert sigints == []


def test_a_server_error_is_still_retried_as_flower_does(sigints):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise _status_error(503)
        return "ok"

    invoker = _retry_invoker()
    invoker.wait_function = lambda _s: None  # no real back-off in a unit test
    assert invoker.invoke(flaky) == "ok"
    assert len(calls) == 2
    assert sigints == []


def test_a_refused_heartbeat_marks_the_task_withdrawn_without_sigint(sigints):
    withdrawn = threading.Event()
    client = SimpleNamespace(SendTaskHeartbeat=lambda _req: SimpleNamespace(success=False))
    assert _task_heartbeat_fn(client, withdrawn)() is True  # nothing to retry
    assert withdrawn.is_set()
    assert sigints == []

    ok = threading.Event()
    alive = SimpleNamespace(SendTaskHeartbeat=lambda _req: SimpleNamespace(success=True))
    assert _task_heartbeat_fn(alive, ok)() is True
    assert not ok.is_set()


def _serve(monkeypatch, tokens, run_task):
    """serve_tasks against a fake SuperNode that hands out ``tokens``, then stops the worker."""
    stop = threading.Event()
    tasks = iter(tokens)

    def acquire(_req):
        token = next(tasks, None)
        if token is None:
            stop.set()
            return SimpleNamespace(HasField=lambda _f: False, token="")
        return SimpleNamespace(HasField=lambda f: f == "task", token=token)

    fake = SimpleNamespace(AcquireTask=acquire, close=lambda: None)
    monkeypatch.setattr(client_worker, "_client", lambda *_a: fake)
    monkeypatch.setattr(client_worker, "run_task", run_task)
    return client_worker.serve_tasks("127.0.0.1:1", stop, poll_s=0.0)


def test_the_worker_keeps_serving_after_a_task_fails(monkeypatch):
    ran = []

    def run_task(_address, token, _certs=None, _lock=None):
        ran.append(token)
        if token == "stale-task":
            raise TaskWithdrawn("the SuperNode refused the task (HTTP 401)")
        return "completed"

    assert _serve(monkeypatch, ["stale-task", "next-run-task"], run_task) == 2
    assert sorted(ran) == ["next-run-task", "stale-task"]


def test_a_task_whose_message_never_arrives_does_not_hold_up_the_next(monkeypatch):
    # CI, 2026-11-28: after a SuperLink restart a SuperNode handed out a task of the dead run
    # whose objects it had stopped pulling; the worker waited on it, and the new run's query
    # to that client was never answered ("only 2 of 3 clients connected").
    next_done = threading.Event()
    order = []

    def run_task(_address, token, _certs=None, _lock=None):
        if token == "stale-task":
            order.append("stale waits")
            assert next_done.wait(timeout=10), "the next task never ran beside the stale one"
            order.append("stale gives up")
        else:
            order.append("next runs")
            next_done.set()
        return "completed"

    assert _serve(monkeypatch, ["stale-task", "next-run-task"], run_task) == 2
    assert order == ["stale waits", "next runs", "stale gives up"]


def test_concurrent_tasks_call_the_client_app_one_at_a_time(monkeypatch):
    # Tasks share the worker's model (fedvision.fl.clientapp caches one per process).
    import fedvision.fl.clientapp as clientapp_module

    inside, overlaps = [], []

    def app(message, context):
        if inside:
            overlaps.append(1)
        inside.append(1)
        time.sleep(0.05)
        inside.pop()
        return "reply"

    def pulled(_client):
        run = SimpleNamespace(fab_id=client_worker.FAB_ID, fab_version=client_worker.__version__)
        return "message", "context", run, None

    monkeypatch.setattr(clientapp_module, "app", app)
    monkeypatch.setattr(client_worker, "_pull_task_input", pulled)
    monkeypatch.setattr(client_worker, "_client", lambda *_a: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(client_worker, "_task_heartbeat_fn", lambda *_a: lambda: True)
    import flwr.supernode.runtime.run_clientapp as run_clientapp

    monkeypatch.setattr(run_clientapp, "push_message", lambda *a, **k: None)
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda *a, **k: None)
    lock = threading.Lock()
    threads = [
        threading.Thread(target=client_worker.run_task, args=("a", str(i), None, lock))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert overlaps == []


def test_clients_on_one_host_log_to_their_own_files_by_default(monkeypatch, tmp_path):
    # Three clients started as docs/tutorials/grpc-federation.md starts them (no --log) once
    # wrote one shared supernode.log, their lines interleaved.
    import signal as signal_module

    from fedvision.cli import main
    from fedvision.runtime import deploy

    seen = []
    monkeypatch.setattr(deploy, "run_client", lambda opts, _stop: seen.append(opts.log) or 0)
    monkeypatch.chdir(tmp_path)
    sigs = (signal_module.SIGINT, signal_module.SIGTERM)
    handlers = {s: signal_module.getsignal(s) for s in sigs}
    try:
        for pid in (0, 2):
            args = ["client", "--server", "localhost:9092", "--partition-id", str(pid)]
            assert main([*args, "--insecure"]) == 0
        assert main([*args, "--insecure", "--log", "mine.log"]) == 0
    finally:
        for sig, handler in handlers.items():
            signal_module.signal(sig, handler)
    assert [str(p) for p in seen] == ["supernode-0.log", "supernode-2.log", "mine.log"]


def test_stopping_cuts_the_back_off_against_a_gone_supernode_short():
    # CI, 2026-12-07: a stopped client stops its SuperNode first; the worker's next call then
    # failed and Flower's back-off (15.7 s that time) outlasted the 10 s before SIGKILL, so
    # the client died without saying how many tasks it ran. Nothing listens on this port.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = threading.Event()
    done = []
    worker = threading.Thread(
        target=lambda: done.append(client_worker.serve_tasks(f"127.0.0.1:{port}", stop)),
        daemon=True,
    )
    worker.start()
    time.sleep(3.0)  # long enough for Flower's back-off to have grown past a second
    started = time.monotonic()
    stop.set()
    worker.join(timeout=10.0)
    assert not worker.is_alive(), "the worker was still retrying 10 s after stop"
    assert done == [0]
    assert time.monotonic() - started < 2.0
