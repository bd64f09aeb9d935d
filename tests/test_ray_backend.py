"""The simulation's Ray backend drops actors that died (fedvision.runtime.ray_backend).

Fake actors stand in for Ray's: no Ray starts here. The same behaviour on a real cluster that
loses a node is ``tests/test_raycluster.py`` (marker ``raycluster``).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import ray
from flwr.server.superlink.fleet.vce.backend import raybackend

from fedvision.runtime import ray_backend
from fedvision.runtime.ray_backend import NodeLossTolerantRayBackend, tolerant_backend


class _Actor:
    """Answers ``run.remote(...)`` with a callable that ``ray.get`` (patched) calls."""

    def __init__(self, name: str, dead: bool = False, seconds: float = 0.0) -> None:
        self.name, self.dead, self.seconds, self.served = name, dead, seconds, []
        self.run = SimpleNamespace(remote=self._remote)

    def _remote(self, app_fn, message, cid, context):
        def result():
            time.sleep(self.seconds)
            if self.dead:
                raise ray.exceptions.ActorDiedError()
            self.served.append(cid)
            return cid, f"reply-{cid}", context

        return result


def _backend(monkeypatch, *actors: _Actor) -> NodeLossTolerantRayBackend:
    monkeypatch.setattr(
        ray_backend, "ray", SimpleNamespace(get=lambda f: f(), exceptions=ray.exceptions)
    )
    backend = object.__new__(NodeLossTolerantRayBackend)  # its __init__ would start Ray
    backend.pool = SimpleNamespace(pool=list(actors), num_actors=len(actors))
    backend.app_fn = object
    backend._free = threading.Condition()
    return backend


def _context(pid: int) -> SimpleNamespace:
    return SimpleNamespace(node_config={"partition-id": pid})


def test_a_dead_actor_fails_its_message_and_leaves_the_pool(monkeypatch):
    live, dead = _Actor("live"), _Actor("dead", dead=True)
    backend = _backend(monkeypatch, live, dead)  # pop() takes the dead one first
    with pytest.raises(ray.exceptions.ActorDiedError):
        backend.process_message("m0", _context(0))
    assert backend.pool.pool == [live] and backend.pool.num_actors == 1
    # Flower's backend would hand the dead actor out again; every later message runs.
    for pid in range(1, 5):
        assert backend.process_message("m", _context(pid))[0] == f"reply-{pid}"
    assert live.served == ["1", "2", "3", "4"] and backend.pool.pool == [live]


def test_messages_wait_for_the_one_live_actor_instead_of_failing(monkeypatch):
    live = _Actor("live", seconds=0.05)
    backend = _backend(monkeypatch, live)
    replies: list[str] = []

    def send(pid: int) -> None:
        replies.append(backend.process_message("m", _context(pid))[0])

    threads = [threading.Thread(target=send, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(replies) == [f"reply-{p}" for p in range(4)]
    assert sorted(live.served) == ["0", "1", "2", "3"] and backend.pool.pool == [live]


def test_once_every_actor_died_a_message_fails_at_once_with_what_happened(monkeypatch):
    backend = _backend(monkeypatch, _Actor("dead", dead=True))
    with pytest.raises(ray.exceptions.ActorDiedError):
        backend.process_message("m0", _context(0))
    with pytest.raises(RuntimeError, match="no Ray actor is left"):
        backend.process_message("m1", _context(1))


def test_an_error_of_the_client_keeps_its_actor(monkeypatch):
    actor = _Actor("live")
    backend = _backend(monkeypatch, actor)

    def failing(app_fn, message, cid, context):
        def result():
            raise ValueError("the ClientApp raised")

        return result

    actor.run = SimpleNamespace(remote=failing)
    with pytest.raises(ValueError, match="ClientApp raised"):
        backend.process_message("m", _context(0))
    assert backend.pool.pool == [actor] and backend.pool.num_actors == 1


def test_the_engine_builds_the_tolerant_backend_only_inside_the_context():
    flower = raybackend.RayBackend
    with tolerant_backend():
        assert raybackend.RayBackend is NodeLossTolerantRayBackend
    assert raybackend.RayBackend is flower
    with pytest.raises(KeyError), tolerant_backend():
        raise KeyError("a failing simulation")
    assert raybackend.RayBackend is flower
