"""Experiment trackers: each round's record also goes where researchers already look.

``metrics.jsonl`` stays the source of truth (``fedvision report`` reads it); a tracker mirrors
it. The ``tracking`` config group picks one: ``tensorboard`` (the default: event files in
``<run>/tensorboard``, through ``torch.utils.tensorboard``), ``wandb`` or ``mlflow`` (optional
dependencies, offline by default), or ``none``. A run is named after its directory and tagged
with its sweep (the parent directory), so a sweep's runs sit side by side in each tool. A tracker
that fails during a run is switched off with one warning; the run and ``metrics.jsonl`` go on.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedvision.errors import FedvisionError


class Tracker(Protocol):
    """What the server's recorder calls: one record per round, then close."""

    def log(self, record: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers (lists such as ``clients``, strings and None left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "round"
    }


def flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyper-parameters as one level: ``{"strategy._target_": ..., "partition.alpha": 0.5}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str | int | float | bool) else str(v)
    return out


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FedvisionError(
            f"tracking={extra} needs the {module} package: pip install {module} (or use "
            "tracking=tensorboard or tracking=none)"
        ) from None


class NoTracker:
    """``tracking=none``: metrics.jsonl only."""

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Nothing to mirror."""

    def close(self) -> None:
        """Nothing to close."""


class TensorBoardTracker:
    """Event files under ``<run>/<subdir>``: ``tensorboard --logdir SWEEP_DIR`` shows a sweep."""

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], subdir: str = "tensorboard") -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / subdir))
        # The config as text: TensorBoard's HParams view needs final metrics, which a run only
        # has at its end; the text tab shows what the run was at once.
        lines = [f"    {k}: {v}" for k, v in sorted(flat_config(cfg).items())]
        self.writer.add_text("config", "\n".join(lines), 0)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """One scalar per number of the record, at ``step`` (the round)."""
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps every round it logged

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbTracker:
    """Weights & Biases, offline unless ``mode`` says otherwise (``wandb sync`` uploads later)."""

    def __init__(
        self, run_dir: Path, cfg: Mapping[str, Any], project: str = "fedvision",
        mode: str = "offline",
    ) -> None:  # fmt: skip
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(
            project=project, name=run_dir.name, group=run_dir.parent.name, dir=str(run_dir),
            config=flat_config(cfg), mode=mode, resume="allow", id=_run_id(run_dir),
        )  # fmt: skip

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """The record's numbers at ``step``."""
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        """Finish the W&B run."""
        self.run.finish()


class MlflowTracker:
    """MLflow, into a local SQLite store (``<sweep dir>/mlflow.db``) unless ``uri`` names one.

    MLflow 3 refuses its old file store (``./mlruns``) unless told otherwise, so the default is
    the database backend it asks for; one file per sweep keeps the sweep's runs side by side.
    """

    def __init__(
        self, run_dir: Path, cfg: Mapping[str, Any], uri: str | None = None,
        experiment: str = "fedvision",
    ) -> None:  # fmt: skip
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri or default_mlflow_uri(run_dir))
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_dir.name, tags={"sweep": run_dir.parent.name})
        params = flat_config(cfg)
        # MLflow refuses values over 6000 characters and batches of over 100 params.
        items = [(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """The record's numbers at ``step``."""
        self.mlflow.log_metrics(scalars(record), step=step)

    def close(self) -> None:
        """End the MLflow run."""
        self.mlflow.end_run()


def default_mlflow_uri(run_dir: Path) -> str:
    """``sqlite:////abs/<sweep dir>/mlflow.db``: MLflow's local database store for the sweep."""
    return f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


def _run_id(run_dir: Path) -> str:
    # A resumed run continues the same W&B run: the id comes from the directory, not a clock.
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


TRACKERS = {
    "none": NoTracker,
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


def check_tracking(cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown tracker or one whose package is missing, before any work."""
    kind = str((cfg.get("tracking") or {}).get("kind", "none"))
    if kind not in TRACKERS:
        raise FedvisionError(f"tracking.kind={kind!r} is not one of {', '.join(TRACKERS)}")
    if kind != "none":
        _require(kind, kind)


def build_tracker(cfg: Mapping[str, Any], run_dir: Path) -> Tracker:
    """The tracker that ``cfg.tracking`` names (``kind`` plus that tracker's own keys)."""
    options = dict(cfg.get("tracking") or {"kind": "none"})
    kind = str(options.pop("kind", "none"))
    if kind not in TRACKERS:
        raise FedvisionError(f"tracking.kind={kind!r} is not one of {', '.join(TRACKERS)}")
    if kind == "none":
        return NoTracker()
    try:
        return TRACKERS[kind](run_dir, cfg, **options)
    except TypeError as exc:  # an unknown key in conf/tracking/<kind>.yaml or an override
        raise FedvisionError(f"tracking={kind}: {exc}") from exc
