"""Shared test set-up: offline Flower, a private FEDVISION_HOME, deterministic torch."""

from __future__ import annotations

import os

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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so that fixtures can tell a failed test."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
