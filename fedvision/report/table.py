"""``fedvision report``: runs grouped by settings, mean ± std over seeds (markdown, CSV, PNG).

A group is every run whose resolved config is the same once the seed (and keys that do not change
results: progress, verbosity, the runtime, the evaluation device) are set aside. A run that failed
or did not finish is listed with its status and never averaged in.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np

from fedvision import constants as C
from fedvision.errors import FedvisionError
from fedvision.report.metrics import read_metrics
from fedvision.rundir import flatten, load_run_config, read_status

# Keys that do not change a run's numbers (or that a group averages over: the seed).
IGNORED = (
    "seed", "partition.seed", "resume", "overwrite", "progress", "verbose", "device",
    "data.workers",
)  # fmt: skip
IGNORED_PREFIXES = ("runtime.", "hydra.")


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    status: str  # finished | failed | interrupted | unfinished | unreadable
    settings: dict[str, Any]
    seed: int
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    error: str | None = None
    partition: dict[str, Any] = field(default_factory=dict)  # partition.json: fingerprint, TV


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run directories at or below ``paths`` (Hydra's multirun folders included), sorted."""
    found: set[Path] = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FedvisionError(f"{path} does not exist; pass run or sweep directories")
        for cfg in [path / C.RUN_CONFIG, *path.rglob(C.RUN_CONFIG)]:
            # Hydra keeps its own config.yaml in .hydra/; a run directory has fedvision's.
            if cfg.is_file() and cfg.parent.name != ".hydra":
                found.add(cfg.parent)
    if not found:
        raise FedvisionError(f"no fedvision run directory under {', '.join(map(str, paths))}")
    return sorted(found)


def load_run(path: Path) -> Run:
    """Read one run directory: its settings, status, summary and per-round records.

    A run whose files cannot be read (damaged, edited, cut short) comes back ``unreadable``
    with the reason, so that a report lists it and goes on with the others.
    """
    try:
        return _load_run(path)
    except Exception as exc:  # YAML, JSON, OS or missing-key errors from any of its files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Run(path, "unreadable", {}, 0, error=f"{type(exc).__name__}: {reason}")


def _load_run(path: Path) -> Run:
    flat = flatten(load_run_config(path))
    settings = {
        k: v for k, v in flat.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)
    }
    status = read_status(path)
    summary_file = path / C.RUN_SUMMARY
    if status is not None and status["status"] == "finished" and summary_file.is_file():
        state, error, summary = "finished", None, json.loads(summary_file.read_text())
    elif status is not None and status["status"] in ("failed", "interrupted"):
        state, error, summary = status["status"], status.get("error"), {}
    else:
        state, error, summary = "unfinished", None, {}
    part_file = path / C.PARTITION_SUMMARY
    partition = json.loads(part_file.read_text()) if part_file.is_file() else {}
    return Run(
        path, state, settings, int(flat.get("seed", 0)), summary, read_metrics(path), error,
        partition,
    )  # fmt: skip


def rounds_to_target(records: Sequence[dict], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if none does)."""
    return next((r["round"] for r in records if (r.get("test_accuracy") or -1.0) >= target), None)


def sim_time_to_target(records: Sequence[dict], target: float) -> float | None:
    """Simulated seconds until test accuracy first reaches ``target`` (None if never, or no clock).

    Round 0 (the initial model) is at simulated time 0; a run without ``system`` has no clock.
    """
    if not has_clock(records):
        return None
    for r in records:
        if (r.get("test_accuracy") or -1.0) >= target:
            return float(r.get("sim_time_s") or 0.0) if r["round"] > 0 else 0.0
    return None


def has_clock(records: Sequence[dict]) -> bool:
    """Whether a run recorded simulated time (it ran with a ``system`` option other than none)."""
    return any(r.get("sim_time_s") is not None for r in records)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def _grouping(run: Run, by: Sequence[str] | None) -> dict[str, Any]:
    if by is None:
        return run.settings
    # A prefix names a whole config group: `strategy` stands for every strategy.* key.
    return {
        k: v for k, v in run.settings.items() if any(k == b or k.startswith(b + ".") for b in by)
    }


def _class_name(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _null_parent(settings: dict[str, Any], key: str) -> str | None:
    """The part of the config above ``key`` that these settings hold as null, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in settings:
            return parent if settings[parent] is None else None
    return None


def group_runs(runs: Sequence[Run], by: Sequence[str] | None = None) -> list[tuple[str, list[Run]]]:
    """Runs grouped by settings; each group named by the settings that differ between groups.

    ``by`` restricts the grouping to these keys (or key prefixes): runs that differ only in
    other settings are pooled, e.g. ``by=["partition.alpha"]`` averages over strategies too.
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(_grouping(run, by), sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    keys = sorted({k for run in runs for k in _grouping(run, by)})
    varying = [
        k for k in keys if len({json.dumps(r.settings.get(k), default=str) for r in runs}) > 1
    ]
    named = []
    for members in groups.values():
        s = _grouping(members[0], by)
        # A `_target_` is named by its class (strategy=FedProx), the way a reader knows it. A key
        # this group lacks (FedAvg has no proximal_mu) says nothing, unless the group set that
        # part of the config to null where others fill it: then it has none of it
        # (privacy.wrapper=none, privacy.dpsgd=none).
        parts: list[str] = []
        for k in varying:
            if s.get(k) is not None:
                name = k.removesuffix("._target_")
                parts.append(f"{name}={_class_name(s[k]) if name != k else s[k]}")
            elif (parent := _null_parent(s, k)) is not None and f"{parent}=none" not in parts:
                parts.append(f"{parent}=none")
        named.append((", ".join(parts) or "all runs", members))
    return sorted(named)


SORT_KEYS = ("group", "accuracy", "heterogeneity")


def summarise(
    runs: Sequence[Run],
    target: float,
    *,
    group_by: Sequence[str] | None = None,
    sort_by: str = "group",
) -> list[dict[str, Any]]:
    """One row per group: mean and std over its finished runs, and how many runs it has.

    Each row also says how non-IID its partitions were (``label_tv``: the mean total-variation
    distance of a client's label distribution to the global one, 0 = IID) and how many distinct
    partitions (fingerprints) its runs used. ``sort_by``: ``group`` (name), ``accuracy`` (test
    accuracy at the best validation round, best first) or ``heterogeneity`` (label_tv, IID first).
    """
    if sort_by not in SORT_KEYS:
        raise FedvisionError(f"sort by {sort_by!r}: use one of {', '.join(SORT_KEYS)}")
    rows = []
    for name, members in group_runs(runs, group_by):
        done = [r for r in members if r.status == "finished"]
        row: dict[str, Any] = {
            "group": name,
            "runs": len(done),
            "seeds": " ".join(str(r.seed) for r in done),
            "not_finished": len(members) - len(done),
        }
        row["label_tv_mean"], row["label_tv_std"] = _mean_std(
            [float(r.partition["mean_tv"]) for r in done if "mean_tv" in r.partition]
        )
        row["partitions"] = len({r.partition["fingerprint"] for r in done if r.partition})
        for key in ("test_accuracy_final", "test_accuracy_at_best_val", "wall_s"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(
                [float(r.summary[key]) for r in done if r.summary.get(key) is not None]
            )
        row["bytes_mean"], _ = _mean_std(
            [float(r.summary.get("bytes_down", 0) + r.summary.get("bytes_up", 0)) for r in done]
        )
        reached = [rounds_to_target(r.records, target) for r in done]
        row["rounds_to_target_mean"], row["rounds_to_target_std"] = _mean_std(
            [float(x) for x in reached if x is not None]
        )
        row["reached_target"] = sum(x is not None for x in reached)
        clocked = [r for r in done if has_clock(r.records)]
        if clocked:  # simulated system heterogeneity: time in simulated seconds
            sim = [sim_time_to_target(r.records, target) for r in clocked]
            row["sim_s_to_target_mean"], row["sim_s_to_target_std"] = _mean_std(
                [x for x in sim if x is not None]
            )
            row["sim_reached_target"] = sum(x is not None for x in sim)
            row["sim_time_s_mean"], row["sim_time_s_std"] = _mean_std(
                [max(float(x.get("sim_time_s") or 0.0) for x in r.records) for r in clocked]
            )
        # Differential privacy: the run's final epsilon (client-level, else the largest DP-SGD
        # epsilon of any client) at the delta of its config.
        row["epsilon_mean"], row["epsilon_std"] = _mean_std(
            [float(r.summary["epsilon"]) for r in done if r.summary.get("epsilon") is not None]
        )
        deltas = {r.summary["privacy"]["delta"] for r in done if "privacy" in r.summary}
        row["delta"] = deltas.pop() if len(deltas) == 1 else None
        rows.append(row)
    if any("sim_reached_target" in row for row in rows):  # one set of columns for the CSV
        for row in rows:
            for key in ("sim_s_to_target", "sim_time_s"):
                row.setdefault(f"{key}_mean", None)
                row.setdefault(f"{key}_std", None)
            row.setdefault("sim_reached_target", None)
    if sort_by == "accuracy":
        rows.sort(key=lambda r: -(r["test_accuracy_at_best_val_mean"] or -1.0))
    elif sort_by == "heterogeneity":
        rows.sort(key=lambda r: (r["label_tv_mean"] is None, r["label_tv_mean"] or 0.0))
    return rows


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def format_markdown(rows: Sequence[dict[str, Any]], runs: Sequence[Run], target: float) -> str:
    """The table a paper could use, plus the runs that were left out and why."""
    # Simulated-time columns only when some run has a simulated clock (system=...); the
    # epsilon column only when some run used differential privacy.
    clock = any(r.get("sim_reached_target") is not None for r in rows)
    private = any(r.get("epsilon_mean") is not None or r.get("delta") for r in rows)
    lines = [
        f"| group | runs | label TV | test acc. (final) | test acc. at best val. | "
        f"rounds to {target:g} | "
        + (f"sim. s to {target:g} | sim. s total | " if clock else "")
        + "GB moved | wall s |"
        + (" ε (δ) |" if private else ""),
        (
            "| --- | ---: | ---: | ---: | ---: | ---: | "
            + "---: | " * ((4 if clock else 2) + (1 if private else 0))
        ).rstrip(),
    ]
    for r in rows:
        reach = f"{_pm(r['rounds_to_target_mean'], r['rounds_to_target_std'], '{:.1f}')} "
        reach += f"({r['reached_target']}/{r['runs']})"
        sim = ""
        if clock:
            if r.get("sim_reached_target") is None:
                sim = "- | - | "
            else:
                sim = (
                    f"{_pm(r['sim_s_to_target_mean'], r['sim_s_to_target_std'], '{:.1f}')} "
                    f"({r['sim_reached_target']}/{r['runs']}) | "
                    f"{_pm(r['sim_time_s_mean'], r['sim_time_s_std'], '{:.1f}')} | "
                )
        gb = "-" if r["bytes_mean"] is None else f"{r['bytes_mean'] / 1e9:.2f}"
        tv = _pm(r["label_tv_mean"], r["label_tv_std"], "{:.2f}")
        eps = ""
        if private:
            eps = f" {_pm(r.get('epsilon_mean'), r.get('epsilon_std'), '{:.2f}')}"
            eps += f" ({r['delta']:g}) |" if r.get("delta") else " |"
        lines.append(
            f"| {r['group']} | {r['runs']} | {tv} | "
            f"{_pm(r['test_accuracy_final_mean'], r['test_accuracy_final_std'])} | "
            f"{_pm(r['test_accuracy_at_best_val_mean'], r['test_accuracy_at_best_val_std'])} | "
            f"{reach} | {sim}{gb} | {_pm(r['wall_s_mean'], r['wall_s_std'], '{:.0f}')} |" + eps
        )
    left_out = [r for r in runs if r.status != "finished"]
    if left_out:
        lines += ["", "Not averaged (not finished):"]
        lines += [
            f"- {r.path}: {r.status}" + (f" ({r.error})" if r.error else "") for r in left_out
        ]
    return "\n".join(lines) + "\n"


def plot_groups(runs: Sequence[Run], path: Path, group_by: Sequence[str] | None = None) -> Path:
    """Test accuracy per round per group: the mean over seeds, with a band of ± one std."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, members) in enumerate(group_runs(runs, group_by)):
        curves = [
            {
                r["round"]: r["test_accuracy"]
                for r in m.records
                if r.get("test_accuracy") is not None
            }
            for m in members
            if m.status == "finished"
        ]
        rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not rounds:
            continue
        acc = np.array([[c[r] for r in rounds] for c in curves])
        mean, std = acc.mean(axis=0), acc.std(axis=0, ddof=1) if len(acc) > 1 else 0 * acc[0]
        # Matplotlib cycles 10 colours: later groups get another line style.
        style = ("-", "--", ":")[(i // 10) % 3]
        ax.plot(rounds, mean, marker="o", linestyle=style, label=f"{name} (n={len(acc)})")
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="mean ± std over seeds")
    return _save(fig, ax, path)


def _save(fig: Any, ax: Any, path: Path, legend_y: float = -0.12) -> Path:
    """Grid, the legend below the axes (group names are long, a sweep has many), PNG, close."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, legend_y))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _step_curve(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """A run's test accuracy over simulated time (round 0 at time 0)."""
    pts = [
        (0.0 if r["round"] == 0 else float(r.get("sim_time_s") or 0.0), float(r["test_accuracy"]))
        for r in records
        if r.get("test_accuracy") is not None
    ]
    t, acc = zip(*pts, strict=True) if pts else ((), ())
    return np.asarray(t, dtype=float), np.asarray(acc, dtype=float)


def plot_sim_time(
    runs: Sequence[Run], path: Path, group_by: Sequence[str] | None = None
) -> Path | None:
    """Test accuracy over simulated time per group: mean ± std over seeds (None: no clock).

    Seeds reach their evaluations at different simulated times, so each run is a step function
    (the accuracy of its latest evaluated round) read on the union of the group's times.
    """
    groups = [
        (name, [m for m in members if m.status == "finished" and has_clock(m.records)])
        for name, members in group_runs(runs, group_by)
    ]
    groups = [(name, members) for name, members in groups if members]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, members) in enumerate(groups):
        curves = [_step_curve(m.records) for m in members]
        curves = [(t, a) for t, a in curves if t.size]
        if not curves:
            continue
        grid = np.unique(np.concatenate([t for t, _ in curves]))
        # The latest evaluation at or before each time (before a run's first one: its first).
        acc = np.array(
            [a[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, None)] for t, a in curves]
        )
        mean = acc.mean(axis=0)
        std = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)
        style = ("-", "--", ":")[(i // 10) % 3]
        ax.step(grid, mean, where="post", linestyle=style, label=f"{name} (n={len(acc)})")
        ax.fill_between(grid, mean - std, mean + std, step="post", alpha=0.2)
    ax.set(
        xlabel="simulated time (s)", ylabel="test accuracy", ylim=(0, 1),
        title="mean ± std over seeds, against simulated time (not wall time)",
    )  # fmt: skip
    return _save(fig, ax, path)


def plot_privacy(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy (at the best validation round) against epsilon: one point per group.

    Groups without a finite epsilon (no DP, or no noise) are drawn as a dashed line across the
    plot: the accuracy that privacy is paid in. None when no group has an epsilon.
    """
    private = [r for r in rows if r.get("epsilon_mean") not in (None, math.inf)]
    if not private:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in private:
        ax.errorbar(
            r["epsilon_mean"], r["test_accuracy_at_best_val_mean"],
            xerr=r["epsilon_std"] or 0.0, yerr=r["test_accuracy_at_best_val_std"] or 0.0,
            marker="o", capsize=3, label=f"{r['group']} (n={r['runs']})",
        )  # fmt: skip
    for r in rows:
        if r.get("epsilon_mean") is None and r.get("test_accuracy_at_best_val_mean") is not None:
            ax.axhline(r["test_accuracy_at_best_val_mean"], linestyle="--", color="grey")
            ax.annotate(
                f"no DP: {r['group']}", (0.01, r["test_accuracy_at_best_val_mean"]),
                xycoords=("axes fraction", "data"), fontsize=7, va="bottom",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set(
        xlabel="epsilon (client-level unless DP-SGD), log scale",
        ylabel="test accuracy at best val. round", ylim=(0, 1),
        title="privacy against accuracy: mean ± std over seeds",
    )  # fmt: skip
    return _save(fig, ax, path, legend_y=-0.15)


def write_report(
    paths: Sequence[Path],
    out: Path,
    *,
    target: float = 0.5,
    group_by: Sequence[str] | None = None,
    sort_by: str = "group",
) -> str:
    """Read the runs under ``paths``; write the markdown table, the CSV and the plots to ``out``.

    Runs with a simulated clock (``system=...``) also get ``report_sim_time.png``, runs with
    differential privacy ``report_privacy.png``.
    """
    runs = [load_run(p) for p in find_run_dirs(paths)]
    rows = summarise(runs, target, group_by=group_by, sort_by=sort_by)
    text = format_markdown(rows, runs, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / C.REPORT_MD).write_text(text)
    with (out / C.REPORT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["group"])
        writer.writeheader()
        writer.writerows(rows)
    plot_groups(runs, out / C.REPORT_PLOT, group_by)
    plot_sim_time(runs, out / C.REPORT_SIM_PLOT, group_by)
    plot_privacy(rows, out / C.REPORT_PRIVACY_PLOT)
    return text
