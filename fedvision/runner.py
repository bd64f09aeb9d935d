"""``fedvision run``: compose the config, prepare data and partitions, build the model, simulate.

Orchestration only: every step is a call into a layer (data, models, fl, runtime, report).
Everything that can be wrong with the config or the inputs is checked here, before Ray starts.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedvision import constants as C
from fedvision.atomic import write_json_atomic
from fedvision.config import CONF_DIR
from fedvision.data.cache import PreparedDataset, prepare_dataset
from fedvision.data.folder import ClassSelection
from fedvision.data.generate import generate_dataset
from fedvision.data.partition import (
    Partition,
    PartitionSpec,
    client_class_counts,
    format_partition_table,
    make_partition,
    partition_stats,
    save_partition,
    summary_stats,
)
from fedvision.errors import FedvisionError
from fedvision.fl.clientapp import make_client_app
from fedvision.fl.round_config import round_lr, to_train_config, train_config
from fedvision.fl.server import ServerPlan, build_strategy
from fedvision.fl.serverapp import RunOutcome, make_server_app
from fedvision.models import build_model, list_architectures
from fedvision.report.heatmap import plot_partition_heatmap
from fedvision.report.metrics import read_metrics
from fedvision.runtime.simulation import backend_config, run_in_simulation

# What a resumed run may change; everything else is the saved run's config.
RESUMABLE_KEYS = ("num_rounds", "progress", "verbose", "device", "resume")
PACKAGES = ("fedvision", "torch", "torchvision", "flwr", "ray", "numpy", "hydra-core")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, plus Python and the platform."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def prepare_data(data: DictConfig, *, progress: bool) -> PreparedDataset:
    """Generate (built-in only) and decode the dataset once; reuse the cache afterwards."""
    if data.root is None:
        root = generate_dataset(progress=progress)
        subset = str(data.subset)
        if subset not in ("source", "target", "all"):
            raise FedvisionError(f"data.subset={subset!r}: use source, target or all")
        class_file = {"source": C.SOURCE_CLASSES, "target": C.TARGET_CLASSES}.get(subset)
        selection = (
            None if class_file is None else ClassSelection.from_config(file=root / class_file)
        )
    else:
        root = Path(str(data.root)).expanduser()
        selection = None
        if data.first_n is not None or data.wnids is not None or data.classes_file is not None:
            selection = ClassSelection.from_config(
                first_n=data.first_n,
                wnids=list(data.wnids) if data.wnids is not None else None,
                file=data.classes_file,
            )
    return prepare_dataset(
        root,
        size=int(data.size),
        selection=selection,
        max_per_class=data.max_per_class,
        workers=data.workers,
        progress=progress,
    )


def check_config(cfg: DictConfig) -> None:
    """Refuse impossible settings now rather than hours into a run (before any data work)."""
    n = int(cfg.num_clients)
    if n < 1 or int(cfg.num_rounds) < 1 or int(cfg.eval_every) < 1:
        raise FedvisionError("num_clients, num_rounds and eval_every must all be >= 1")
    s = cfg.strategy
    for key in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        if int(s.get(key, 0)) > n:
            raise FedvisionError(
                f"strategy.{key}={s[key]} but only num_clients={n} clients exist; "
                f"lower strategy.{key} or raise num_clients"
            )
    for key in ("fraction_train", "fraction_evaluate"):
        if not 0.0 <= float(s.get(key, 0.0)) <= 1.0:
            raise FedvisionError(f"strategy.{key}={s[key]} must lie in [0, 1]")
    if float(s.fraction_evaluate) > 0 and float(cfg.partition.get("val_fraction", 0)) <= 0:
        raise FedvisionError(
            "strategy.fraction_evaluate > 0 needs local validation data: set partition.val_fraction"
        )
    build_strategy(s)
    if str(cfg.model.name) not in list_architectures():
        build_model(str(cfg.model.name), 2)  # raises the error with close names
    # The round-1 config through the same path the clients use: TrainConfig validates itself.
    record = {**train_config(OmegaConf.to_container(cfg, resolve=True), 1, 2), "server-round": 1}
    to_train_config(record, 0)
    round_lr(cfg.client, int(cfg.num_rounds), int(cfg.num_rounds))
    backend_config(cfg.runtime)


def write_partition(
    prepared: PreparedDataset, partition_cfg: DictConfig, out_dir: Path
) -> tuple[Partition, str]:
    """Partition the training labels; write the partition file, its table and its heatmap."""
    labels = prepared.train.labels
    spec = PartitionSpec.from_mapping(OmegaConf.to_container(partition_cfg, resolve=True))
    partition = make_partition(labels, spec, num_classes=len(prepared.classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_partition(partition, out_dir / C.PARTITION_FILE)
    table = format_partition_table(
        partition_stats(partition, labels), summary_stats(partition, labels)
    )
    (out_dir / C.PARTITION_STATS).write_text(
        f"partition fingerprint: {partition.fingerprint}\n\n{table}\n"
    )
    plot_partition_heatmap(
        client_class_counts(partition, labels),
        out_dir / C.PARTITION_HEATMAP,
        class_names=list(prepared.train.class_names),
        title=f"{spec.scheme} partition, {spec.num_clients} clients",
    )
    return partition, table


def _resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path]:
    run_dir = Path(str(cfg.resume)).expanduser()
    saved = run_dir / C.RUN_CONFIG
    if not (run_dir / C.CKPT_LATEST).exists() or not saved.exists():
        raise FedvisionError(
            f"resume={run_dir}: no {C.CKPT_LATEST} and {C.RUN_CONFIG} there; "
            "point resume at the directory of a run that finished at least one round"
        )
    base = OmegaConf.load(saved)
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "resume":
            continue
        if key not in RESUMABLE_KEYS:
            raise FedvisionError(
                f"a resumed run keeps its saved config; {key} cannot change "
                f"(allowed: {', '.join(k for k in RESUMABLE_KEYS if k != 'resume')})"
            )
        base[key] = cfg[key]
    base.resume = str(run_dir)
    return base, run_dir


def _load_resume_state(run_dir: Path, num_classes: int) -> tuple[dict, int, list[dict]]:
    ckpt = torch.load(run_dir / C.CKPT_LATEST, map_location="cpu", weights_only=True)
    if int(ckpt.get("num_classes", -1)) != num_classes:
        raise FedvisionError(
            f"{run_dir / C.CKPT_LATEST} is for {ckpt.get('num_classes')} classes, the data has "
            f"{num_classes}"
        )
    start = int(ckpt["round"])
    history = [r for r in read_metrics(run_dir) if int(r["round"]) <= start]
    return ckpt["model"], start, history


def run_experiment(cfg: DictConfig, run_dir: Path, *, resuming: bool = False) -> dict[str, Any]:
    """Run one federated experiment into ``run_dir``; return its summary."""
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    # The resolved config and versions go into the run directory before any work starts.
    (run_dir / C.RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(run_dir / C.RUN_VERSIONS, package_versions())
    prepared = prepare_data(cfg.data, progress=bool(cfg.progress))
    num_classes = len(prepared.classes)

    labels = prepared.train.labels
    partition, _ = write_partition(prepared, cfg.partition, run_dir)
    partition_file = run_dir / C.PARTITION_FILE
    spec = partition.spec

    if resuming:
        state, start_round, history = _load_resume_state(run_dir, num_classes)
    else:
        torch.manual_seed(int(cfg.seed))  # initialisation is part of the seeded run
        model = build_model(
            str(cfg.model.name),
            num_classes,
            weights=str(cfg.model.weights),
            finetune=str(cfg.model.finetune),
            last_k=int(cfg.model.last_k),
            allow_head_mismatch=bool(cfg.model.get("allow_head_mismatch", False)),
        )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        start_round, history = 0, []

    print(
        f"fedvision: {num_classes} classes, {len(labels)} train / {len(prepared.val.labels)} "
        f"test images, {spec.num_clients} clients ({spec.scheme}), "
        f"partition {partition.fingerprint[:16]}\nfedvision: run directory {run_dir}",
        file=sys.stderr,
    )
    plan = ServerPlan(
        cfg=OmegaConf.to_container(cfg, resolve=True),
        run_dir=run_dir,
        num_classes=num_classes,
        test_cache=prepared.val.path,
        initial_state=state,
        start_round=start_round,
        history=history,
    )
    outcome = RunOutcome()
    client_app = make_client_app(
        {C.NODE_CACHE_DIR: str(prepared.train.path), C.NODE_PARTITION_FILE: str(partition_file)}
    )
    try:
        run_in_simulation(
            make_server_app(plan, outcome),
            client_app,
            int(cfg.num_clients),
            cfg.runtime,
            verbose=bool(cfg.verbose),
        )
    except Exception:
        if outcome.error is None:
            raise
    if outcome.error is not None:
        raise outcome.error
    if outcome.summary is None:
        raise FedvisionError("the simulation ended without a result; rerun with verbose=true")
    summary = {**outcome.summary, "wall_s": round(time.perf_counter() - t0, 2)}
    write_json_atomic(run_dir / C.RUN_SUMMARY, summary)
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra task: one run (or one job of a ``-m`` sweep)."""
    hc = HydraConfig.get()
    try:
        if cfg.resume is not None:
            cfg, run_dir = _resumed_config(cfg, list(hc.overrides.task))
            summary = run_experiment(cfg, run_dir, resuming=True)
        else:
            summary = run_experiment(cfg, Path(hc.runtime.output_dir))
    except FedvisionError as exc:
        # A user mistake: one line, no traceback (Hydra would print one for any exception).
        print(f"fedvision: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))
    return summary.get("final_accuracy")
