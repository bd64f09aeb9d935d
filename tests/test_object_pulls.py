"""A message's objects that have not arrived yet are asked for again after 50 ms, not Flower's 1 s.

scripts/bench_deploy.py traced about 1 s lost at each end of a deployment round to Flower's
first retry (fedvision/fl/pulls.py). No SuperLink starts here.
"""

from __future__ import annotations

import time
from itertools import pairwise
from types import ModuleType

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from flwr.supernode import start_client_internal

from fedvision.fl import pulls


def _gaps(pull, misses: int) -> list[float]:
    """Seconds between the tries of ``pull`` for one object that is missing ``misses`` times."""
    times: list[float] = []

    def fetch(object_id: str) -> bytes:
        times.append(time.monotonic())
        if len(times) <= misses:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull(["obj"], fetch) == {"obj": b"content"}
    return [b - a for a, b in pairwise(times)]


def _module() -> ModuleType:
    module = ModuleType("flower_like")
    module.pull_objects = pull_objects
    return module


def test_inside_a_missing_object_is_asked_again_within_50_ms_then_flower_s_timing_is_back():
    module = _module()
    with pulls.prompt_object_pulls(module):
        gaps = _gaps(module.pull_objects, misses=3)
    assert len(gaps) == 3 and max(gaps) < 0.3  # 50, 100, 200 ms (±20 %), plus scheduling
    assert gaps[0] < 0.15
    assert module.pull_objects is pull_objects
    (flower_gap,) = _gaps(module.pull_objects, misses=1)
    assert flower_gap >= 0.75  # Flower's own first retry: 1 s ± 20 %


def test_the_swap_is_undone_when_the_run_fails():
    module = _module()
    with pytest.raises(ValueError), pulls.prompt_object_pulls(module):
        raise ValueError("the run failed")
    assert module.pull_objects is pull_objects


def test_flower_s_modules_still_call_pull_objects_by_name_and_a_moved_one_fails_loudly():
    for module in (http_grid, start_client_internal):  # the ServerApp's grid, the SuperNode
        with pulls.prompt_object_pulls(module):
            assert module.pull_objects.keywords["initial_backoff"] == pulls.OBJECT_RETRY_S
        assert module.pull_objects is pull_objects
    moved = ModuleType("moved")
    with pytest.raises(RuntimeError, match="no longer calls Flower's pull_objects"):
        pulls.tune(moved)


def test_only_a_deployment_grid_is_tuned():
    grid = http_grid.HttpGrid.__new__(http_grid.HttpGrid)  # no SuperLink to connect to
    with pulls.object_pulls_for(grid):
        assert http_grid.pull_objects is not pull_objects
    assert http_grid.pull_objects is pull_objects
    with pulls.object_pulls_for(InMemoryGrid.__new__(InMemoryGrid)):
        assert http_grid.pull_objects is pull_objects


def test_the_supernode_launcher_tunes_its_object_pulls(monkeypatch):
    import flwr.client.grpc_rere_client.connection as connection
    import flwr.supercore.heartbeat as heartbeat

    from fedvision.runtime.supernode import apply_timings

    # apply_timings patches this process's Flower modules: put everything back after.
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(start_client_internal, "pull_objects", pull_objects)
    for module in (connection, heartbeat):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    apply_timings(0.1, 10.0)
    (gap,) = _gaps(start_client_internal.pull_objects, misses=1)
    assert gap < 0.15


def test_the_server_pulls_promptly_while_it_runs_a_deployment_s_rounds(monkeypatch, tmp_path):
    from fedvision.fl import server

    seen = []
    monkeypatch.setattr(server, "load_run_config", lambda _run_dir: {})
    monkeypatch.setattr(server, "InterruptibleGrid", lambda grid, _run_dir: grid)
    monkeypatch.setattr(
        server, "run_rounds", lambda *_a: seen.append(http_grid.pull_objects) or {"rounds": 1}
    )
    assert server.serve(http_grid.HttpGrid.__new__(http_grid.HttpGrid), tmp_path) == {"rounds": 1}
    assert seen[0] is not pull_objects and seen[0].keywords["max_tries_per_object"] is None
    assert http_grid.pull_objects is pull_objects
