"""The waits of a simulated round: the engine's message pickup and the round loop's poll.

A cross-device cohort round is about 0.35 s here; Flower's 0.1 s pickup and a 50 ms poll cost a
fifth of it (scripts/bench_cross_device.py), so a cohort run waits less. No Ray starts here.
"""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
import time

from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedvision.fl import directory
from fedvision.fl.directory import InterruptibleGrid, exchange, poll_interval
from fedvision.runtime.simulation import COHORT_PICKUP_S, pickup_wait, prompt_pickup


class _State:
    """A LinkState that holds one message for node 7 from ``ready_at`` on."""

    def __init__(self, ready_at: float) -> None:
        self.ready_at, self.asked = ready_at, []

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.asked.append((node_id, limit))
        if node_id == 7 and time.monotonic() >= self.ready_at and "taken" not in self.asked:
            self.asked.append("taken")
            return ["message"]
        return []


def _pickup_delay(wait_s: float | None) -> float:
    """Seconds from a message being stored to the engine's extractor queueing it (None:
    Flower's own extractor)."""
    state, q, stop = _State(time.monotonic() + 0.25), queue.Queue(), threading.Event()
    with prompt_pickup(wait_s) if wait_s is not None else contextlib.nullcontext():
        extractor = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(state, q, {3: 0, 7: 1}, stop)
        )
    extractor.start()
    try:
        assert q.get(timeout=2) == "message"
        return time.monotonic() - state.ready_at
    finally:
        stop.set()
        extractor.join(timeout=2)
        assert not extractor.is_alive()  # it stops with the engine's stop event


def test_the_cohort_pickup_queues_a_message_within_its_wait_where_flowers_takes_longer():
    delays = [_pickup_delay(COHORT_PICKUP_S) for _ in range(5)]
    assert max(delays) < 0.04  # 5 ms wait; a loaded CI machine gets slack
    # Flower's own loop waits 0.1 s between looks: over 5 tries its mean delay is near 50 ms.
    flower = [_pickup_delay(None) for _ in range(5)]
    assert sum(flower) / len(flower) > sum(delays) / len(delays) + 0.01


def test_the_pickup_is_swapped_in_only_inside_the_context_and_fits_flowers_signature():
    flower = vce_api.add_messages_to_queue
    # The replacement is called as Flower's is; an upgrade that changes the call fails here.
    assert list(inspect.signature(flower).parameters) == [
        "state", "queue", "nodes_mapping", "f_stop",
    ]  # fmt: skip
    with prompt_pickup(0.01):
        assert vce_api.add_messages_to_queue is not flower
    assert vce_api.add_messages_to_queue is flower
    try:
        with prompt_pickup(0.01):
            raise KeyError("a failing simulation")
    except KeyError:
        pass
    assert vce_api.add_messages_to_queue is flower


class _Grid:
    """A grid whose reply to every pushed message comes ``after_s`` after the push."""

    def __init__(self, after_s: float) -> None:
        self.after_s, self.pulls = after_s, 0

    def push_messages(self, messages):
        self.at = time.monotonic() + self.after_s
        return ["m1"]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() < self.at:
            return []
        reply = type("Reply", (), {})()
        reply.metadata = type("Meta", (), {"reply_to_message_id": "m1"})()
        return [reply]


def test_the_round_loop_polls_the_in_memory_grid_more_often_than_a_remote_one(tmp_path):
    in_memory = InMemoryGrid.__new__(InMemoryGrid)  # its type is what decides, not its state
    assert poll_interval(InterruptibleGrid(in_memory, tmp_path)) == directory.IN_MEMORY_POLL_S
    assert poll_interval(in_memory) == directory.IN_MEMORY_POLL_S
    assert poll_interval(InterruptibleGrid(_Grid(0), tmp_path)) == directory.POLL_S
    assert directory.IN_MEMORY_POLL_S < directory.POLL_S
    # exchange waits the poll it is given between pulls: 0.2 s of waiting is about 0.2 / poll.
    fast, slow = _Grid(0.2), _Grid(0.2)
    assert len(exchange(fast, ["msg"], timeout_s=5, poll_s=0.005)) == 1
    assert len(exchange(slow, ["msg"], timeout_s=5, poll_s=0.05)) == 1
    assert slow.pulls <= 6 < fast.pulls


def test_the_pickup_wait_grows_with_the_nodes_and_is_flower_s_own_from_40_on():
    # Each look asks the state once per node: at most 400 asks a second.
    assert pickup_wait(2) == COHORT_PICKUP_S  # two cohort workers, or two clients
    assert pickup_wait(10) == 0.025
    assert pickup_wait(39) < 0.1
    assert pickup_wait(40) is None and pickup_wait(1000) is None  # Flower's 0.1 s, unpatched
