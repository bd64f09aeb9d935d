"""The run directory as the one handle on an experiment, for the launcher and both Flower apps.

``fedvision run`` writes the resolved config, the partition, the initial weights and a plan
(``run.json``) into the run directory before any runtime starts. The ServerApp and ClientApp
find that directory through the Flower run config (``run-dir``), whichever runtime loaded them,
and the server reports back through files there (``metrics.jsonl``, ``summary.json``,
``status.json``): no closures over the launcher's objects, no side channels.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fedvision import constants as C
from fedvision.atomic import append_jsonl, read_jsonl, write_json_atomic
from fedvision.errors import FedvisionError


class RunInterrupted(Exception):
    """The run was stopped by a signal (SIGINT/SIGTERM); its last complete round is kept."""


class RunSuperseded(RunInterrupted):
    """A newer server took the run over (a restart): this one must write nothing more."""


def claim_server(run_dir: Path) -> str:
    """Make this server process the run directory's only writer; return its token.

    A server that lost its SuperLink can reconnect to a restarted one and go on writing while
    the resumed server writes too; the newest claim wins and the older server stops.
    """
    token = uuid.uuid4().hex
    write_json_atomic(run_dir / C.RUN_SERVER, {"token": token, "pid": os.getpid()})
    return token


def superseded(run_dir: Path, token: str) -> bool:
    """Whether another server claimed the run directory after the one holding ``token``."""
    path = run_dir / C.RUN_SERVER
    try:
        return json.loads(path.read_text()).get("token") != token
    except (OSError, ValueError):
        return False  # unreadable: keep going (a claim is written atomically)


def interrupt_requested(run_dir: Path) -> bool:
    """Whether the launcher asked the server to stop (it got a signal)."""
    return (run_dir / C.RUN_INTERRUPT).exists()


@dataclass(frozen=True)
class RunPlan:
    """What the launcher prepared for a run (``run.json``); paths are absolute.

    Attributes
    ----------
    num_classes : classes of the dataset.
    train_cache, test_cache : decoded caches of the training and test splits.
    partition_file : the clients' index lists into the training cache.
    server_val_file : training indices the server holds out for model selection (or None).
    client_device : the device simulated clients train on (a SuperNode's node config wins).
    connect_timeout_s : how long the server waits for every client (the runtime's setting).
    round_timeout_s : how long it waits for a round's replies; later ones count as failed.
    server_app, client_app : ``module:attr`` of the Flower apps the run uses (SecAgg+ and cohort
        execution have their own ClientApp); a runtime loads them with :func:`load_app`.
    cohort_workers : 0, or how many worker nodes train the round's clients in cohorts
        (``fedvision.fl.cohort``); the server then expects that many nodes.
    client_state_dir : where clients keep their state between rounds when every client sees
        the run directory (``fedvision.fl.client_state``); None: in their Flower Contexts.
    """

    num_classes: int
    train_cache: str
    test_cache: str
    partition_file: str
    server_val_file: str | None
    client_device: str
    # Defaults: run directories prepared before the plan held them.
    connect_timeout_s: float = 120.0
    round_timeout_s: float = 3600.0
    server_app: str = "fedvision.fl.serverapp:app"
    client_app: str = "fedvision.fl.clientapp:app"
    cohort_workers: int = 0
    client_state_dir: str | None = None


def load_app(ref: str) -> Any:
    """The object a ``module:attr`` reference names (how a SuperLink loads apps, too)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def write_plan(run_dir: Path, plan: RunPlan) -> None:
    """Write ``run.json``."""
    write_json_atomic(run_dir / C.RUN_PLAN, asdict(plan))


def read_plan(run_dir: Path) -> RunPlan:
    """Read ``run.json`` of a prepared run directory."""
    path = run_dir / C.RUN_PLAN
    if not path.is_file():
        raise FedvisionError(
            f"{run_dir} is not a prepared fedvision run directory (no {C.RUN_PLAN}); make one "
            "with `fedvision run ... runtime=prepare_only hydra.run.dir=DIR`"
        )
    return RunPlan(**json.loads(path.read_text()))


def run_dir_from(run_config: Mapping[str, Any]) -> Path:
    """The run directory named by a Flower run config (``--run-config "run-dir='...'"``)."""
    value = str(run_config.get(C.RUN_DIR_KEY, "") or "")
    if not value:
        raise FedvisionError(
            f"the Flower run config has no {C.RUN_DIR_KEY!r}; pass --run-config "
            f"\"{C.RUN_DIR_KEY}='/abs/path/to/run'\" (a directory prepared by fedvision run)"
        )
    path = Path(value).expanduser()
    if not path.is_absolute():
        # The server and client processes of `flwr run` do not share the caller's directory.
        raise FedvisionError(f"{C.RUN_DIR_KEY}={value!r} must be an absolute path")
    return path


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The config the next round runs with: ``config.yaml`` plus each resume's changes, in order."""
    path = run_dir / C.RUN_CONFIG
    if not path.is_file():
        raise FedvisionError(f"{run_dir} has no {C.RUN_CONFIG}; is it a fedvision run directory?")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for entry in read_resumes(run_dir):
        for key, (_, new) in entry["changes"].items():
            cfg[key] = new
    return cfg


def read_resumes(run_dir: Path) -> list[dict[str, Any]]:
    """The resume records of a run (empty when it was never resumed)."""
    return read_jsonl(run_dir / C.RUN_RESUMES)


def append_resume(run_dir: Path, after_round: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Record that the run continues after ``after_round`` with ``changes`` (key: (old, new))."""
    entry = {"after_round": after_round, "changes": dict(changes), "time": time.time()}
    append_jsonl(run_dir / C.RUN_RESUMES, entry)


def write_status(run_dir: Path, status: str, error: str | None = None, **extra: Any) -> None:
    """Say how the server ended: ``finished``, ``failed`` (with the one-line error) or
    ``interrupted`` (by a signal, with the last complete ``round``)."""
    write_json_atomic(
        run_dir / C.RUN_STATUS, {"status": status, "error": error, "time": time.time(), **extra}
    )


def claim_run_dir(path: Path, *, overwrite: bool) -> None:
    """Make sure a new run is the only one writing ``path`` (before Hydra creates anything).

    A directory that holds anything is refused unless ``overwrite``, which empties it, and only
    when it holds a fedvision run (never a folder of other files).
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise FedvisionError(f"hydra.run.dir={path} is a file; choose a directory")
    entries = sorted(path.iterdir())
    if not entries:
        return
    is_run = (path / C.RUN_CONFIG).is_file() or (path / C.HYDRA_RECORD).is_dir()
    if not overwrite:
        held = "a run" if is_run else "other files"
        raise FedvisionError(
            f"{path} already holds {held}; continue it with resume={path}, replace it with "
            "overwrite=true, or choose another hydra.run.dir"
        )
    if not is_run:
        raise FedvisionError(
            f"overwrite=true empties only a fedvision run directory; {path} holds other files"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(f"fedvision: overwrite=true: emptied {path}", file=sys.stderr)


class DirGuard(Callback):
    """Hydra callback: a new run checks its config (``check``), then claims ``hydra.run.dir``.

    Runs before Hydra creates the directory, so a bad value or a refused directory leaves
    nothing behind (one line, exit 2). A run with ``resume=`` is checked once its saved config
    is read.
    """

    def check(self, config: DictConfig) -> None:
        """Refuse the new run's config (without its ``hydra`` node); nothing by default."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check a new run's config, then claim ``hydra.run.dir`` for it."""
        if config.get("resume") is not None:
            return
        try:
            self.check(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
            claim_run_dir(Path(config.hydra.run.dir), overwrite=bool(config.get("overwrite")))
        except FedvisionError as exc:
            print(f"fedvision: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def append_node_event(run_dir: Path, event: Mapping[str, Any]) -> None:
    """Record who holds which partition, or who was refused one, in ``nodes.jsonl``."""
    append_jsonl(run_dir / C.RUN_NODES, dict(event))


def read_node_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``nodes.jsonl`` (empty before any server wrote it)."""
    path = run_dir / C.RUN_NODES
    return read_jsonl(path) if path.exists() else []


def describe_node_event(event: Mapping[str, Any]) -> str | None:
    """The line a person should see for a node event: refusals and hand-overs, else None."""
    node, pid = event["node"], event["partition"]
    if event["event"] == "refused":
        return (
            f"fedvision: node {node} claims partition {pid}, held by node {event['held_by']}: "
            f"refused (sent nothing while node {event['held_by']} is connected)"
        )
    if "before" in event:
        why = "it is gone" if event.get("before_gone") else f"node {node} claimed it first"
        return f"fedvision: partition {pid} passes from node {event['before']} to {node} ({why})"
    return None


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The server's last status, or None when it never wrote one."""
    path = run_dir / C.RUN_STATUS
    return json.loads(path.read_text()) if path.exists() else None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}`` (how runs are compared and grouped)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
