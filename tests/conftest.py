"""Shared test set-up: offline Flower, a private FEDVISION_HOME, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Two cores are shared by torch's threads, Ray's workers and pytest: one thread per process keeps
# tests from stalling each other (and makes CPU results independent of the core count).
torch.set_num_threads(1)

# Flower must never reach the network from tests (see ../shared/FLOWER-NOTES.md).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Give every test its own FEDVISION_HOME and FLWR_HOME so nothing leaks between tests."""
    home = tmp_path_factory.mktemp("fvhome")
    monkeypatch.setenv("FEDVISION_HOME", str(home / "fedvision"))
    monkeypatch.setenv("FLWR_HOME", str(home / "flwr"))
    yield


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity; outside a runtime there is none."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory) -> Path:
    """A tiny built-in dataset (3 target classes, 12 + 4 images each at 16 px), made once."""
    from fedvision.data.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("generated") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


@pytest.fixture
def grids(task_identity) -> SimpleNamespace:
    """The in-process Grids of ``tests/grids.py`` (messages need the task identity)."""
    from tests.grids import InlineGrid, LoopbackGrid, ScriptedGrid

    return SimpleNamespace(inline=InlineGrid, loopback=LoopbackGrid, scripted=ScriptedGrid)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so that fixtures can tell a failed test."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
