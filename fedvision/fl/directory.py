"""Which node holds which partition, and the exchange of messages with them.

:class:`ClientDirectory` asks each node which partition it holds and keeps the first claimant;
:func:`exchange` sends a round's messages and collects the replies within a timeout;
:class:`InterruptibleGrid` stops every wait when the launcher asks the run to stop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from tqdm import tqdm

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.rundir import (
    RunInterrupted,
    RunSuperseded,
    append_node_event,
    claim_server,
    describe_node_event,
    interrupt_requested,
    superseded,
)

# How often the round loop asks the grid for replies. Flower's deployment grid sleeps 3 s between
# pulls in send_and_receive; a short poll costs a few tiny requests and saves seconds per round.
POLL_S = 0.05
# The simulation's grid answers a pull from memory (no request), so it is asked more often: half
# the poll is the mean wait for a reply that came, 25 ms a round at POLL_S, a tenth of a
# cross-device cohort round (scripts/bench_cross_device.py).
IN_MEMORY_POLL_S = 0.005
# Error codes the SuperLink writes for a node it cannot reach (Flower's ErrorCode): the node's
# query is retried at the next refresh instead of failing the run.
UNREACHABLE = (3, 4, 5)  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE
# How long a node that just appeared gets to say which partition it holds.
QUERY_TIMEOUT_S = 15.0
# How many unanswered queries per node are still waited for (the newest), so a node that never
# answers does not grow the pull without bound.
OPEN_QUERIES = 8


def poll_interval(grid: Grid) -> float:
    """How long :func:`exchange` waits between pulls on ``grid`` (shorter in memory)."""
    inner = grid.inner if isinstance(grid, InterruptibleGrid) else grid
    return IN_MEMORY_POLL_S if isinstance(inner, InMemoryGrid) else POLL_S


def exchange(
    grid: Grid, messages: Iterable[Message], timeout_s: float, poll_s: float | None = None
) -> list[Message]:
    """Send ``messages``, collect the replies that come within ``timeout_s``.

    ``Grid.send_and_receive`` with a short poll (late replies are dropped, as there); ``poll_s``
    None: :func:`poll_interval`.
    """
    poll_s = poll_interval(grid) if poll_s is None else poll_s
    pending = set(grid.push_messages(list(messages)))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return replies


class ClientDirectory:
    """Which partition each connected node holds, kept current as nodes come and go.

    Node ids are assigned by the SuperLink; partition ids are what a node says it holds. A node
    is asked (a QUERY message) which partition it holds when it appears. A partition belongs
    to the first node that claimed it: while that node is connected, another node claiming
    the same partition is refused (it is sent nothing), so a node that joins late cannot
    replace an honest one. When the holder is gone, the next claimant in claim order holds
    the partition until an earlier one comes back. With node authentication (on with TLS) a
    node id is its registered key, stable across restarts; without it a restarted client
    comes back under a new id and takes its partition over once the SuperLink has dropped the
    old one. A node not heard from is asked again at each refresh, and its earlier queries
    stay open: an answer to any of them counts whenever it comes (a node busy with a dead
    run's task answers its queries late, in order, and waiting only for the newest would keep
    it one behind for good). A node the SuperLink answers for as unreachable is asked again at
    the next refresh.
    Every change of holder and every refusal goes to ``on_event`` (the run's ``nodes.jsonl``);
    ``held_before`` (node, partition) from that file keeps the claim order across a resume.
    """

    def __init__(
        self,
        expected: int,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        held_before: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.expected = int(expected)
        self.on_event = on_event
        self.partition_of: dict[int, int] = {}  # node -> partition, the node that holds it now
        self.claims: dict[int, int] = {}  # node -> partition, in claim order
        for node, pid in held_before:
            self.claims.setdefault(int(node), int(pid))
        self._asked: set[int] = set()  # connected nodes that answered this server
        self._holder: dict[int, int] = {}  # partition -> node, as of the last refresh
        self._refused: dict[int, int] = {}  # node -> the holder it was last refused for
        self._open: dict[int, list[str]] = {}  # node -> its unanswered queries' message ids
        self._unreachable: dict[int, int] = {}  # node -> times the SuperLink answered for it

    def refresh(self, grid: Grid, timeout_s: float = QUERY_TIMEOUT_S) -> list[int]:
        """Ask new nodes which partition they hold; return the partitions that changed holder."""
        nodes = set(grid.get_node_ids())
        self._asked &= nodes  # a node that was away is asked again: it may have restarted
        self._open = {n: ids for n, ids in self._open.items() if n in nodes}
        new = sorted(nodes - self._asked)
        queries = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in new
        ]
        for node, message_id in zip(
            new, grid.push_messages(queries) if queries else [], strict=True
        ):
            self._open[node] = [*self._open.get(node, []), message_id][-OPEN_QUERIES:]
        for node, reply in self._answers(grid, timeout_s).items():
            if reply.has_error() and int(reply.error.code) in UNREACHABLE:
                # The SuperLink answers for a node it lost (a restart, a lapsed heartbeat): not
                # the client's fault; it is asked again at the next refresh if it comes back.
                self._unreachable[node] = self._unreachable.get(node, 0) + 1
                continue
            if reply.has_error():
                raise FedvisionError(
                    f"client on node {node} failed to start: "
                    f"{reason_line(reply.error.reason, reply.error.code)}"
                )
            pid = int(reply.content[C.KEY_METRICS][C.KEY_PARTITION_ID])
            if not 0 <= pid < self.expected:
                raise FedvisionError(
                    f"a client reports partition {pid}, but the run has num_clients="
                    f"{self.expected} (ids 0..{self.expected - 1}): fix its --partition-id"
                )
            self._asked.add(node)
            if self.claims.get(node) != pid:  # a new claim (or another partition): last in line
                self.claims.pop(node, None)
                self.claims[node] = pid
        # Claim order decides; only nodes connected and heard from by this server count.
        present = nodes & self._asked
        holder: dict[int, int] = {}
        for node, pid in self.claims.items():
            if node in present:
                holder.setdefault(pid, node)
        changed = []
        for pid, node in sorted(holder.items()):
            before = self._holder.get(pid)
            if before != node:
                changed.append(pid)
                self._refused.pop(node, None)  # refused again later is news again
                gone = None if before is None else before not in present
                self._event("holds", node, pid, before=before, before_gone=gone)
        for node, pid in self.claims.items():
            if node in present and holder[pid] != node and self._refused.get(node) != holder[pid]:
                self._refused[node] = holder[pid]
                self._event("refused", node, pid, held_by=holder[pid])
        self._holder = holder
        self.partition_of = {n: p for p, n in holder.items()}
        return changed

    def _answers(self, grid: Grid, timeout_s: float) -> dict[int, Message]:
        """One answer per node with open queries, as they come within ``timeout_s``.

        A node's first answer closes all its queries; a real answer beats the SuperLink's
        error in the same pull.
        """
        asked = {m: n for n, ids in self._open.items() for m in ids}
        answers: dict[int, Message] = {}
        deadline = time.monotonic() + timeout_s
        while asked:
            got = sorted(grid.pull_messages(set(asked)), key=lambda m: m.has_error())
            for reply in got:
                node = asked.get(reply.metadata.reply_to_message_id)
                if node is not None and node not in answers:
                    answers[node] = reply
                    del self._open[node]
            asked = {m: n for m, n in asked.items() if n not in answers}
            if not asked or time.monotonic() > deadline:
                break
            time.sleep(poll_interval(grid))
        return dict(sorted(answers.items()))

    def _unheard(self) -> str:
        """Why connected nodes hold nothing: each one's open query or the SuperLink's answers."""
        why = [
            f"node {n}: {len(ids)} queries not answered" for n, ids in sorted(self._open.items())
        ]
        why += [
            f"node {n}: the SuperLink answered {k} of its queries as unreachable"
            for n, k in sorted(self._unreachable.items())
            if n not in self._asked and n not in self._open
        ]
        return "; " + "; ".join(why) if why else ""

    def _event(self, event: str, node: int, pid: int, **extra: int | bool | None) -> None:
        if self.on_event is not None:
            self.on_event(
                {"event": event, "node": node, "partition": pid, "time": round(time.time(), 3)}
                | {k: v for k, v in extra.items() if v is not None}
            )

    def wait_for_all(self, grid: Grid, timeout_s: float) -> dict[int, int]:
        """Wait until every partition 0..expected-1 is held by a connected node."""
        deadline = time.monotonic() + timeout_s
        while len(set(self.partition_of.values())) < self.expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                have = sorted(set(self.partition_of.values()))
                raise FedvisionError(
                    f"only {len(have)} of {self.expected} clients connected within "
                    f"{timeout_s:g} s (runtime.connect_timeout_s); partitions present: {have}"
                    + self._unheard()
                )
            self.refresh(grid, min(QUERY_TIMEOUT_S, max(remaining, 1.0)))
            if len(set(self.partition_of.values())) < self.expected:
                time.sleep(0.1)
        return dict(self.partition_of)


def node_log(run_dir: Path) -> Callable[[dict[str, Any]], None]:
    """Record the directory's events in ``nodes.jsonl``; print refusals and hand-overs."""

    def log(event: dict[str, Any]) -> None:
        append_node_event(run_dir, event)
        if (line := describe_node_event(event)) is not None:
            tqdm.write(line, file=sys.stderr)

    return log


def in_partition_order(
    replies: Iterable[Message], partition_of: Mapping[int, int]
) -> list[Message]:
    """``replies`` sorted by the partition their node holds."""
    # Float sums depend on order: aggregating in partition order makes the result reproducible.
    return sorted(replies, key=lambda m: partition_of.get(m.metadata.src_node_id, 1 << 30))


def reason_line(reason: str | None, code: int) -> str:
    """The line of an error reply's reason a person needs: its last, without Flower's wrapping.

    Flower's simulation writes ``<class '...'>:<'MESSAGE'>``; a ClientApp's or Ray's failure is a
    traceback or report whose last line (indented for Ray) says what happened.
    """
    text, kind = (reason or "").strip(), None
    if text.startswith("<class '") and "'>:<'" in text and text.endswith("'>"):
        kind = text[len("<class '") : text.index("'>:<'")].rsplit(".", 1)[-1]
        text = text[text.index("'>:<'") + 5 : -2]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"error code {code}"
    # A one-line message needs its exception's name; a traceback's last line has it already.
    return f"{kind}: {lines[0]}" if kind and len(lines) == 1 else lines[-1]


def failures_of(
    sent: Iterable[Message], replies: Iterable[Message], partition_of: Mapping[int, int]
) -> list[dict[str, Any]]:
    """Who failed this round and why: an error reply, or no reply within the round's timeout.

    Replies are matched to what was sent by message id: an error the SuperLink writes for an
    unreachable node does not come from that node.
    """
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out, answered = [], set()
    for m in replies:
        node = node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
        answered.add(node)
        if m.has_error():
            out.append(
                {
                    "partition": partition_of.get(node),
                    "code": int(m.error.code),
                    "reason": reason_line(m.error.reason, m.error.code),
                }
            )
    for node in node_of.values():
        if node not in answered:
            out.append(
                {
                    "partition": partition_of.get(node),
                    "code": None,
                    "reason": "no reply within runtime.round_timeout_s",
                }
            )
    return sorted(out, key=lambda f: (f["partition"] is None, f["partition"] or 0))


def say_failures(
    rnd: int, failures: Sequence[Mapping[str, Any]], sent: int, ok: int, min_replies: int
) -> None:
    """One stderr line: how many of the ``sent`` clients failed, why, and what the round does."""
    then = (
        f"aggregating the other {ok}"
        if ok >= min_replies
        else f"{ok} replies < min_train_replies={min_replies}: the global model stays as it was"
    )
    tqdm.write(
        f"fedvision: round {rnd}: {len(failures)} of {sent} clients failed "
        f"({failures[0]['reason']}); {then}",
        file=sys.stderr,
    )


def first_error(replies: Iterable[Message]) -> str:
    """The last line of the first error among ``replies`` (what a person needs to see)."""
    for m in replies:
        if m.has_error():
            return reason_line(m.error.reason, m.error.code)
    return "no reply within the timeout"


class InterruptibleGrid:
    """A Grid that raises :class:`RunInterrupted` once the launcher asked the run to stop.

    Every wait of the round loop polls the grid (replies every :func:`poll_interval`, nodes
    while they connect), so a signal stops a round within a poll, whatever the round's length;
    the last complete round's checkpoint stays in place.
    """

    def __init__(self, grid: Grid, run_dir: Path) -> None:
        self._grid, self._run_dir = grid, run_dir
        self._token = claim_server(run_dir)

    @property
    def inner(self) -> Grid:
        """The grid this one wraps."""
        return self._grid

    def _check(self) -> None:
        if superseded(self._run_dir, self._token):
            raise RunSuperseded(f"{self._run_dir}: another server took this run over")
        if interrupt_requested(self._run_dir):
            raise RunInterrupted(f"{self._run_dir}: stopped by a signal")

    def check(self) -> None:
        """Raise unless this server may still write the run (before each write of a round)."""
        self._check()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Grid.push_messages, unless the run was asked to stop."""
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Grid.pull_messages, unless the run was asked to stop."""
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Grid.send_and_receive (what Flower's SecAgg+ workflow calls), checked both sides."""
        self._check()
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        self._check()
        return replies

    def get_node_ids(self) -> Iterable[int]:
        """Grid.get_node_ids, unless the run was asked to stop."""
        self._check()
        return self._grid.get_node_ids()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
