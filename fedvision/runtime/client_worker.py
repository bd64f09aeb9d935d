"""A warm task executor for a SuperNode: runs fedvision's ClientApp in one long-lived process.

Flower 1.39's SuperNode hands each message to a SuperExec, which starts a fresh ``flwr-clientapp``
process per message: Python, the FAB install, torch, torchvision and fedvision are imported and
the model and data cache opened again for every train and every evaluate message (several
seconds each on a small machine, and the ClientApp's caches never live past one message).
Flower's own warm executor exists only for Kubernetes. This worker takes the SuperExec's place
for a SuperNode started with ``--isolation process``: it acquires each task from the SuperNode's
Runtime API and runs it in this process, with the ClientApp imported once, so what a client
keeps across rounds (the decoded cache view, its partition, a built model) stays resident here
as it does in a Ray worker. Each task is handled as ``flwr-clientapp`` handles it (pull input,
call the app, push the reply and the context); only the process is reused.

The worker runs the installed fedvision ClientApp, not the FAB's copy: a run of another app or of
another fedvision version gets an error reply that says so, instead of running foreign code.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from fedvision import __version__
from fedvision.errors import FedvisionError

# How long a task waits for its message's objects to reach the SuperNode (Flower: 2 h). A model
# on a slow link takes minutes; a task whose run ended never gets them, and gives up after this.
PULL_MAX_S = 1800.0

# The app a FAB must be for this worker to run it (``[tool.flwr.app] publisher`` / project name).
FAB_ID = "fedvision/fedvision"


class TaskWithdrawn(Exception):
    """The SuperNode no longer knows this task (its run ended or was stopped): drop it."""


def _retry_invoker(stop: threading.Event | None = None):
    """Flower's Runtime API retry policy, minus its reaction to a refused task token.

    On HTTP 401 Flower's policy sends SIGINT to its own process, which is right for a
    one-task ``flwr-clientapp`` but here would stop the whole client: a task of a run that
    ended while the SuperLink was away (a server restart) is refused, and the client must
    go on to the next run's tasks. 401 and 403 (run not running) end this task only.

    With ``stop``, a set event ends the retries and cuts a back-off short: the client stops
    its SuperNode before its worker, whose next call then fails, and Flower's back-off (up to
    minutes, not interruptible) outlasted the 10 s a service manager waits (CI, 2026-12-07).
    """
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403):
            raise TaskWithdrawn(f"the SuperNode refused the task (HTTP {exc.response.status_code})")
        return (stop is not None and stop.is_set()) or flower_giveup(exc)

    invoker.should_giveup = should_giveup
    if stop is not None:
        invoker.wait_function = stop.wait
    return invoker


def _task_heartbeat_fn(client, withdrawn: threading.Event):
    """Flower's task heartbeat, except that a refused beat marks the task withdrawn.

    Flower's own (``make_task_heartbeat_fn_http``) raises SIGINT in its process when the
    SuperNode no longer knows the task; in this long-lived worker that would stop the client.
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False  # the SuperNode is busy or restarting: Flower's sender retries
        except (httpx.HTTPStatusError, TaskWithdrawn):
            withdrawn.set()
            return True
        if not res.success:
            withdrawn.set()
        return True

    return beat


def _client(
    address: str,
    token: str | None,
    root_certificates: bytes | None,
    stop: threading.Event | None = None,
):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=_retry_invoker(stop),
    )


def _pull_task_input(client):
    """``flwr-clientapp``'s ``pull_task_input``, retrying missing objects after 0.05 s.

    A SuperNode hands out a task before it has all of the message's objects from the SuperLink;
    Flower retries such an object after 1, 2, 4, 8 s (its start-up hides this in a fresh
    process). A warm worker asks at once, so it retries quickly instead.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = (
        context_from_proto(res.context),
        run_from_proto(res.run),
        fab_from_proto(res.fab),
    )
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=0.05,
        backoff_cap=0.2,
        max_tries_per_object=None,
        max_time=PULL_MAX_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def run_task(
    address: str,
    token: str,
    root_certificates: bytes | None = None,
    app_lock: threading.Lock | None = None,
) -> str:
    """Run one acquired task (one message) in this process; return its final sub-status.

    ``app_lock`` serialises the ClientApp calls of concurrent tasks (they share one model).
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from fedvision.fl.clientapp import app

    pull_task_input = _pull_task_input
    client = _client(address, token, root_certificates)
    withdrawn = threading.Event()
    heartbeat = HeartbeatSender(_task_heartbeat_fn(client, withdrawn))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, _fab = pull_task_input(client)
        if run.fab_id != FAB_ID or run.fab_version != __version__:
            raise FedvisionError(
                f"this client runs fedvision {__version__}; the run is {run.fab_id} "
                f"{run.fab_version}: install the server's fedvision version on this client"
            )
        with app_lock or contextlib.nullcontext():
            reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except (TaskWithdrawn, RunNotRunningException):
        withdrawn.set()
    except Exception as exc:  # the server must get a reply saying why, whatever failed
        logging.getLogger("fedvision").exception("ClientApp raised an exception")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            # A withdrawn task's run ended meanwhile: nobody waits for its reply.
            if reply is not None and context is not None and not withdrawn.is_set():
                push_message(client, reply, context)
            if not withdrawn.is_set():
                push_task_output(client=client, context=context, sub_status=status, details=details)
        except (TaskWithdrawn, RunNotRunningException):
            status = SubStatus.FAILED  # the run ended meanwhile: nobody waits for this reply
        finally:
            heartbeat.stop()
            client.close()
    return status


def serve_tasks(
    address: str,
    stop: threading.Event,
    *,
    poll_s: float = 0.05,
    root_certificates: bytes | None = None,
) -> int:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run them until ``stop``.

    Returns the number of tasks run. Connection errors (the SuperNode restarting) are retried.

    Each task runs in its own thread, its ClientApp call under one lock: a task whose message
    never arrives must not hold up the next. After a SuperLink restart a SuperNode can hand out
    a task of the run that died with it, whose objects it stopped pulling ("not in RUNNING
    status. Ignoring message") without finishing the task; that task waits for them in its
    thread (up to ``PULL_MAX_S``) while the next run's tasks are served.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    import fedvision.fl.clientapp  # noqa: F401  (torch, torchvision and the app, imported once)

    done = 0
    client = None
    app_lock = threading.Lock()
    running: list[threading.Thread] = []
    while not stop.is_set():
        try:
            if client is None:
                client = _client(address, None, root_certificates, stop)
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception:  # the SuperNode is (re)starting: try again shortly
            if client is not None:
                client.close()
            client = None
            stop.wait(1.0)
            continue
        if res.HasField("task") and res.token:
            task = threading.Thread(
                target=_run_task_logged,
                args=(address, res.token, root_certificates, app_lock),
                name=f"fedvision-task-{done}",
                daemon=True,  # a task still waiting for its message must not keep us alive
            )
            task.start()
            running = [t for t in running if t.is_alive()] + [task]
            done += 1
        else:
            time.sleep(poll_s)
    if client is not None:
        client.close()
    for task in running:
        task.join(timeout=10.0)
    return done


def _run_task_logged(*args) -> None:
    try:
        run_task(*args)
    except Exception:  # one task's trouble must not end the client's service
        logging.getLogger("fedvision").exception("a ClientApp task could not finish")
