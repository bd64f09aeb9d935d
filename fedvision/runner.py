"""``fedvision run``: check the config, prepare the run directory, start the chosen runtime.

Orchestration only: every step is a call into a layer (data, models, fl, runtime, report).
Everything that can be wrong with the config is checked before any data work or runtime starts.
The run directory is the whole hand-over: the runtime's ServerApp reads it and writes its
results into it, and this module reads them back from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedvision import constants as C
from fedvision import pretrain
from fedvision.atomic import (
    append_jsonl,
    read_jsonl,
    save_torch_atomic,
    write_json_atomic,
    write_text_atomic,
)
from fedvision.config import CONF_DIR
from fedvision.errors import FedvisionError
from fedvision.fl.checkpoint import load_checkpoint
from fedvision.fl.cohort import COHORT_CLIENT_APP, check_cohort, cohort_workers
from fedvision.fl.parts import check_local_bn
from fedvision.fl.round_config import check_every_round, lr_horizon
from fedvision.fl.secagg import check_secagg, flower_apps
from fedvision.fl.strategy import check_strategy
from fedvision.models import (
    ARCHITECTURES,
    build_model,
    fixed_input_size,
    list_architectures,
)
from fedvision.prepare import (
    check_data,
    check_weights,
    initial_weights,
    partition_spec,
    prepare_data,
    resolve_weights,
    write_partition,
)
from fedvision.privacy.plan import check_privacy
from fedvision.report.metrics import read_metrics
from fedvision.report.tracking import check_tracking
from fedvision.rundir import (
    DirGuard,
    RunInterrupted,
    RunPlan,
    append_resume,
    flatten,
    load_run_config,
    read_plan,
    read_status,
    write_plan,
    write_status,
)
from fedvision.runtime import Runtime
from fedvision.schema import check_types
from fedvision.system.model import check_system

# What a resumed run may change; everything else is the saved run's config.
RESUMABLE_KEYS = ("num_rounds", "progress", "verbose", "device")
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


def build_runtime(cfg: DictConfig) -> Runtime:
    """The runtime named by ``runtime._target_`` (simulation, prepare_only, ...), checked."""
    try:
        runtime = instantiate(cfg.runtime)
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise FedvisionError(
            f"cannot build runtime {cfg.runtime.get('_target_')!r}: {exc}".splitlines()[0]
        ) from exc
    runtime.check()
    return runtime


def check_config(cfg: DictConfig) -> Runtime:
    """Refuse impossible settings now rather than hours into a run; return the runtime.

    Runs before the dataset is generated or decoded and before any runtime starts: first the
    types of every key (:func:`fedvision.schema.check_types`), then ranges and cross-field rules.
    """
    check_types(cfg)
    for key in ("num_clients", "num_rounds", "eval_every", "eval_batch_size"):
        if int(cfg[key]) < 1:
            raise FedvisionError(f"{key}={cfg[key]} must be >= 1")
    min_replies = int(cfg.get("min_train_replies", 1))  # runs saved before it existed: 1
    if not 1 <= min_replies <= int(cfg.num_clients):
        raise FedvisionError(
            f"min_train_replies={min_replies} must lie in [1, num_clients={cfg.num_clients}]"
        )
    if not 0.0 <= float(cfg.server_val_fraction) < 1.0:
        raise FedvisionError(f"server_val_fraction={cfg.server_val_fraction} must lie in [0, 1)")
    if int(cfg.data.size) < 8:
        raise FedvisionError(f"data.size={cfg.data.size} must be >= 8 pixels")
    steps = cfg.client.local_steps
    if steps is not None and int(steps) < 1:
        raise FedvisionError(
            f"client.local_steps={steps} must be >= 1 (null: whole local epochs, no cap)"
        )
    check_data(cfg.data)
    plain = OmegaConf.to_container(cfg, resolve=True)
    partition_spec(cfg)  # validates scheme, alpha, min_size, val_fraction, ...
    check_strategy(plain)
    if str(cfg.model.name) not in list_architectures():
        build_model(str(cfg.model.name), 2)  # raises the error with close names
    if cfg.model.finetune not in ("full", "head", "last_k"):
        raise FedvisionError(f"model.finetune={cfg.model.finetune!r}: use full, head or last_k")
    if cfg.model.finetune == "last_k":  # the range depends on the architecture's blocks
        build_model(str(cfg.model.name), 2, finetune="last_k", last_k=int(cfg.model.last_k))
    size = fixed_input_size(str(cfg.model.name))
    if size is not None and int(cfg.data.size) != size:
        raise FedvisionError(
            f"model {cfg.model.name} takes {size}x{size} images, but data.size={cfg.data.size}; "
            f"set data.size={size}"
        )
    if str(cfg.model.name) in ARCHITECTURES and str(cfg.model.get("weights")) == "imagenet":
        raise FedvisionError(
            f"model {cfg.model.name} has no ImageNet weights; use model.weights=none or a path"
        )
    check_weights(cfg.model, cfg.data)
    check_local_bn(plain)  # FedBN: a model with BatchNorm that trains, clients that evaluate
    horizon = lr_horizon(plain)
    if horizon < 1:
        raise FedvisionError(f"client.lr_horizon={horizon} must be >= 1")
    check_every_round(plain)  # every round's config, as the clients will read it
    check_tracking(plain)
    check_system(plain)  # simulated devices: values, and the trace file reads
    check_privacy(plain)  # delta, budget, DP-SGD (client-level DP is built by check_strategy)
    runtime = build_runtime(cfg)
    check_secagg(plain, runtime.name)  # SecAgg+: what its legacy-API app pair cannot run
    check_cohort(plain, runtime.name)  # cohorts: what a cohort's mean cannot stand in for
    return runtime


def check_resume_dir(path: str) -> Path:
    """The directory a ``resume=`` names, if it holds a run that can continue (checked first)."""
    run_dir = Path(path).expanduser()
    missing = [n for n in (C.RUN_CONFIG, C.CKPT_LATEST, C.RUN_PLAN) if not (run_dir / n).is_file()]
    if missing:
        raise FedvisionError(
            f"resume={path}: no {', '.join(missing)} there; point resume at the directory of a "
            "run that finished at least one round"
        )
    return run_dir


def resumed_config(
    run_dir: Path, cfg: DictConfig, overrides: list[str]
) -> tuple[DictConfig, dict[str, tuple[Any, Any]]]:
    """The saved run's config with the few keys a resume may change, and those changes."""
    base = OmegaConf.create(load_run_config(run_dir))
    changes: dict[str, tuple[Any, Any]] = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "resume":
            continue
        if key not in RESUMABLE_KEYS:
            raise FedvisionError(
                f"a resumed run keeps its saved config; {key} cannot change "
                f"(allowed: {', '.join(RESUMABLE_KEYS)})"
            )
        if base[key] != cfg[key]:
            changes[key] = (base[key], cfg[key])
            base[key] = cfg[key]
    base.resume = str(run_dir)
    return base, changes


def _prepare_run_dir(
    cfg: DictConfig,
    run_dir: Path,
    runtime: Runtime,
    resume_changes: dict[str, tuple[Any, Any]] | None,
) -> None:
    """Write what the apps read: config, data caches, partition, initial weights, run.json.

    A resumed run keeps its files; only the resume and its changes are recorded.
    """
    resuming = resume_changes is not None
    if resuming:
        plan = read_plan(run_dir)
        done = load_checkpoint(
            run_dir / C.CKPT_LATEST, arch=str(cfg.model.name), num_classes=plan.num_classes
        ).round
        read_metrics(run_dir)  # damage it cannot drop is refused before anything is recorded
        append_resume(run_dir, done, resume_changes)
    else:
        # The resolved config (schedule horizon fixed now) and versions go in before any work.
        if cfg.client.lr_horizon is None:
            cfg.client.lr_horizon = int(cfg.num_rounds)
        write_text_atomic(run_dir / C.RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        write_json_atomic(run_dir / C.RUN_VERSIONS, package_versions())
        prepared = prepare_data(cfg.data, progress=bool(cfg.progress))
        partition = write_partition(prepared, cfg, run_dir)
        num_classes = len(prepared.classes)
        weights = resolve_weights(cfg, pretrain.ensure_pretrained)
        initial, report = initial_weights(cfg, num_classes, weights)
        save_torch_atomic(run_dir / C.RUN_INITIAL, initial)
        load = {"weights": str(cfg.model.weights), "resolved": weights}
        if report is not None:
            load.update(report.to_dict())
            print(f"fedvision: {report.summary()}", file=sys.stderr)
        write_json_atomic(run_dir / C.RUN_WEIGHTS, load)
        plan = RunPlan(
            num_classes=num_classes,
            train_cache=str(Path(prepared.train.path).resolve()),
            test_cache=str(Path(prepared.val.path).resolve()),
            partition_file=str((run_dir / C.PARTITION_FILE).resolve()),
            server_val_file=(
                str((run_dir / C.SERVER_VAL).resolve())
                if (run_dir / C.SERVER_VAL).exists()
                else None
            ),
            client_device=runtime.client_device(),
            connect_timeout_s=runtime.connect_timeout_s,
            round_timeout_s=runtime.round_timeout_s,
            server_app=flower_apps(cfg)[0],
            client_app=COHORT_CLIENT_APP if cohort_workers(cfg) else flower_apps(cfg)[1],
            cohort_workers=cohort_workers(cfg),
            client_state_dir=(
                str((run_dir / C.CLIENT_STATE_DIR).resolve())
                if runtime.shares_run_dir or cohort_workers(cfg)
                else None
            ),
        )
        write_plan(run_dir, plan)
        print(
            f"fedvision: {num_classes} classes, {len(prepared.train.labels)} train / "
            f"{len(prepared.val.labels)} test images, {cfg.num_clients} clients "
            f"({partition.spec.scheme}), partition {partition.fingerprint[:16]}\n"
            f"fedvision: run directory {run_dir}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def signals_stop(run_dir: Path) -> Iterator[None]:
    """While the runtime runs: SIGINT/SIGTERM ask the server to stop (``C.RUN_INTERRUPT``).

    The server stops at its next poll of the grid, keeps the last complete round's checkpoint and
    says ``interrupted``; the runtime is then shut down as after any run. A second signal stops
    at once (KeyboardInterrupt). Outside the main thread signals cannot be caught: a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        (run_dir / C.RUN_INTERRUPT).touch()
        print(
            f"\nfedvision: {signal.Signals(signum).name}: stopping the run at the server's next "
            "poll (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def run_experiment(
    cfg: DictConfig,
    run_dir: Path,
    *,
    resume_changes: dict[str, tuple[Any, Any]] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Prepare ``run_dir`` (unless resuming), run it on the configured runtime; return its summary.

    ``resume_changes`` marks a resumed run: its files stay as they are, the changed keys are
    appended to ``resumes.jsonl``, and the server continues from ``checkpoint_latest.pt``.
    """
    timings = {"start": time.time(), **(timings or {})}
    runtime = check_config(cfg)
    timings["config_checked"] = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime.start(verbose=bool(cfg.verbose))  # Ray's workers warm up while the data is prepared
    timings["runtime_started"] = time.time()
    (run_dir / C.RUN_STATUS).unlink(missing_ok=True)  # an earlier attempt's says nothing now
    (run_dir / C.RUN_INTERRUPT).unlink(missing_ok=True)
    try:
        _prepare_run_dir(cfg, run_dir, runtime, resume_changes)
        timings["data_ready"] = time.time()
        with signals_stop(run_dir):
            runtime.launch(run_dir, int(cfg.num_clients), verbose=bool(cfg.verbose))
    except Exception:
        # The ServerApp says why it stopped in status.json; Flower wraps the exception.
        if (status := read_status(run_dir)) is None or status["status"] != "failed":
            raise
    finally:
        runtime.stop()
    status = read_status(run_dir)
    if status is None:
        if runtime.name == "prepare_only":
            return {"prepared": str(run_dir)}
        raise FedvisionError(
            f"the {runtime.name} runtime ended without a result in {run_dir}; rerun with "
            "verbose=true"
        )
    if status["status"] == "interrupted":
        raise RunInterrupted(
            f"interrupted after round {status.get('round', 0)} (the last complete one, "
            f"checkpointed); continue with resume={run_dir}"
        )
    if status["status"] == "failed":
        if status.get("user_error"):
            raise FedvisionError(status["error"])
        raise RuntimeError(f"the server failed: {status['type']}: {status['error']}")
    summary = json.loads((run_dir / C.RUN_SUMMARY).read_text())
    summary["timings"] = {**timings, **summary.get("timings", {})}
    summary["wall_s"] = round(time.time() - timings["start"], 2)
    write_json_atomic(run_dir / C.RUN_SUMMARY, summary)
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra task: one run (or one job of a ``-m`` sweep)."""
    hc = HydraConfig.get()
    # A sweep runs its jobs in one process: only the first job's start-up includes the process's.
    first_job = int(hc.job.get("num", 0) or 0) == 0
    timings = {"start": _process_start() if first_job else time.time(), "imported": time.time()}
    run_dir = Path(hc.runtime.output_dir)
    try:
        earlier = (
            sweep_job_state(run_dir, cfg)
            if hc.mode == RunMode.MULTIRUN and cfg.resume is None
            else "new"
        )
        if earlier == "finished":
            summary = json.loads((run_dir / C.RUN_SUMMARY).read_text())
            print(f"fedvision: {run_dir} finished earlier with this config: skip", file=sys.stderr)
            return summary.get("val_accuracy_best")
        if earlier == "resumable":  # a sweep stopped mid-run: continue from its checkpoint
            print(f"fedvision: {run_dir} stopped earlier: resuming it", file=sys.stderr)
            cfg, changes = resumed_config(run_dir, cfg, [])
            summary = run_experiment(cfg, run_dir, resume_changes=changes, timings=timings)
        elif cfg.resume is not None:
            run_dir = check_resume_dir(str(cfg.resume))
            cfg, changes = resumed_config(run_dir, cfg, list(hc.overrides.task))
            summary = run_experiment(cfg, run_dir, resume_changes=changes, timings=timings)
        else:
            write_hydra_record(run_dir, cfg)
            summary = run_experiment(cfg, run_dir, timings=timings)
    except RunInterrupted as exc:  # a signal stops a sweep too: its other jobs wait for a re-run
        print(f"fedvision: {exc}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports Ctrl-C
    except SweepJobTaken as exc:  # another run's directory: left exactly as it is
        print(f"fedvision: error: {exc}; the sweep goes on", file=sys.stderr)
        append_jsonl(Path(hc.sweep.dir) / C.SWEEP_REFUSED, {"dir": run_dir.name, "error": str(exc)})
        return None
    except Exception as exc:
        if hc.mode != RunMode.MULTIRUN:
            if isinstance(exc, FedvisionError):
                # A user mistake: one line, no traceback (Hydra would print one otherwise).
                print(f"fedvision: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
        # In a sweep one failed run must not cost the others: record it where `fedvision
        # report` lists it, say so, and go on to the next job.
        record_failed_job(cfg, run_dir, exc)
        return None
    print(json.dumps({k: v for k, v in summary.items() if k != "timings"}))
    return summary.get("val_accuracy_best")


class SweepJobTaken(FedvisionError):
    """A sweep job's directory holds a run of another config (nothing may be written there)."""


# Keys that do not change what a run computes: a re-run sweep may differ in them.
_NOT_IN_RUN = ("progress", "verbose", "resume", "overwrite")


def sweep_job_state(run_dir: Path, cfg: DictConfig) -> str:
    """What a sweep job's directory holds from an earlier attempt of the same sweep.

    ``new`` (nothing, or a run that never reached round 1: start it over), ``finished`` (skip
    it), ``resumable`` (a checkpoint of an unfinished run: continue it). A directory that holds a
    run of another config raises :class:`SweepJobTaken`: a sweep re-run with other values must
    go to another ``hydra.sweep.dir``, never over old results.
    """
    if not (run_dir / C.RUN_CONFIG).is_file():
        return "new"
    saved = load_run_config(run_dir)
    want = OmegaConf.to_container(cfg, resolve=True)
    if want["client"].get("lr_horizon") is None:  # fixed to num_rounds when a run starts
        want["client"]["lr_horizon"] = int(want["num_rounds"])
    if saved["client"].get("lr_horizon") is None:  # a run that failed before it was fixed
        saved["client"]["lr_horizon"] = int(saved["num_rounds"])
    old, new = flatten(saved), flatten(want)
    differ = sorted(
        k
        for k in old.keys() | new.keys()
        if k.split(".")[0] not in _NOT_IN_RUN and old.get(k) != new.get(k)
    )
    if differ:
        raise SweepJobTaken(
            f"{run_dir} holds a run of another config ({', '.join(differ[:3])} differ); sweep "
            "into a new hydra.sweep.dir or remove that directory"
        )
    status = read_status(run_dir) or {}
    if status.get("status") == "finished" and (run_dir / C.RUN_SUMMARY).is_file():
        return "finished"
    if (run_dir / C.CKPT_LATEST).is_file() and (run_dir / C.RUN_PLAN).is_file():
        return "resumable"
    return "new"


def record_failed_job(cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """Leave a failed sweep job's config and reason in its directory, and print one line."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / C.RUN_CONFIG).is_file():  # it failed before the config was written
        write_text_atomic(run_dir / C.RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=False))
    status = read_status(run_dir)
    if status is None or status.get("status") != "failed":  # the server's reason comes first
        write_status(
            run_dir, "failed", reason, user_error=isinstance(exc, FedvisionError),
            type=type(exc).__name__,
        )  # fmt: skip
    if not isinstance(exc, FedvisionError):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"fedvision: run {run_dir} failed: {reason}; the sweep goes on", file=sys.stderr)


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's own record of a new run (``.hydra/``: config, hydra.yaml, overrides.yaml).

    Written by the task, after the checks, instead of by Hydra before them
    (``hydra.output_subdir: null``): a refused run must leave another run's record as it was.
    """
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    out = run_dir / C.HYDRA_RECORD
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(out / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    write_text_atomic(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


class RunDirGuard(DirGuard):
    """Hydra callback of ``fedvision run``: a run directory is written by one run.

    A single run into a directory that holds files is refused (one line, exit 2) unless
    ``resume=`` names it or ``overwrite=true``; checked before Hydra writes anything there.
    """

    def check(self, config: DictConfig) -> None:
        """Check a new run's config before Hydra creates its directory."""
        # run_experiment checks again, for callers that do not come through Hydra.
        check_config(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep never empties a job's directory: it skips or resumes what it finds."""
        if config.get("overwrite"):
            print(
                "fedvision: error: overwrite=true is for one run; a sweep re-run skips its "
                "finished jobs and resumes the others (or sweep into a new hydra.sweep.dir)",
                file=sys.stderr,
            )
            raise SystemExit(2)
        (Path(config.hydra.sweep.dir) / C.SWEEP_REFUSED).unlink(missing_ok=True)


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, list its runs' outcomes in ``sweep.json``.

    Exits with status 1 when any run failed, after every run had its turn, so that a script
    notices (``fedvision report`` still tabulates the finished runs and lists the failed).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write ``<sweep dir>/sweep.json`` and print one line per failed run."""
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        refused = {r["dir"]: r["error"] for r in read_jsonl(sweep_dir / C.SWEEP_REFUSED)}
        for cfg_file in sorted(sweep_dir.glob(f"*/{C.RUN_CONFIG}")):
            status = read_status(cfg_file.parent)
            if cfg_file.parent.name in refused:  # another config's run: not this sweep's result
                status = {"status": "refused", "error": refused[cfg_file.parent.name]}
            elif status is None:  # prepared for `flwr run` (runtime=prepare_only), or cut short
                prepared = (cfg_file.parent / C.RUN_PLAN).is_file()
                status = {"status": "prepared" if prepared else "unfinished"}
            jobs.append(
                {"dir": cfg_file.parent.name, "status": status["status"],
                 "error": status.get("error")}
            )  # fmt: skip
        write_json_atomic(sweep_dir / C.SWEEP_SUMMARY, {"jobs": jobs})
        failed = [j for j in jobs if j["status"] not in ("finished", "prepared")]
        print(
            f"fedvision: sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} runs "
            f"finished" + (f", {len(failed)} did not:" if failed else ""),
            file=sys.stderr,
        )
        for job in failed:
            print(f"  {job['dir']}: {job['status']}: {job['error']}", file=sys.stderr)
        if failed:
            raise SystemExit(1)


def _process_start() -> float:
    """Wall-clock time this process started (Linux; else now), for the start-up breakdown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        # /proc/stat's boot time has whole-second resolution; the boot clock gives it exactly.
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
