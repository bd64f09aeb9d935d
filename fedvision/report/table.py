"""``fedvision report``: runs grouped by settings, mean ± std over seeds (markdown, CSV, PNG).

A group is every run whose resolved config is the same once the seed (and keys that do not change
results: progress, verbosity, the runtime, the evaluation device) are set aside. A run that failed
or did not finish is listed with its status and never averaged in.
"""

from __future__ import annotations

import csv
import json
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
from fedvision.rundir import load_run_config, read_status

# Keys that do not change a run's numbers (or that a group averages over: the seed).
IGNORED = ("seed", "partition.seed", "resume", "progress", "verbose", "device", "data.workers")
IGNORED_PREFIXES = ("runtime.", "hydra.")


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    status: str  # finished | failed | unfinished
    settings: dict[str, Any]
    seed: int
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    error: str | None = None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    """Read one run directory: its settings, status, summary and per-round records."""
    flat = _flatten(load_run_config(path))
    settings = {
        k: v for k, v in flat.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)
    }
    status = read_status(path)
    summary_file = path / C.RUN_SUMMARY
    if status is not None and status["status"] == "finished" and summary_file.is_file():
        state, error, summary = "finished", None, json.loads(summary_file.read_text())
    elif status is not None and status["status"] == "failed":
        state, error, summary = "failed", status.get("error"), {}
    else:
        state, error, summary = "unfinished", None, {}
    return Run(path, state, settings, int(flat.get("seed", 0)), summary, read_metrics(path), error)


def rounds_to_target(records: Sequence[dict], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if none does)."""
    return next((r["round"] for r in records if (r.get("test_accuracy") or -1.0) >= target), None)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def group_runs(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by settings; each group named by the settings that differ between groups."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.settings, sort_keys=True, default=str), []).append(run)
    keys = sorted({k for run in runs for k in run.settings})
    varying = [
        k for k in keys if len({json.dumps(r.settings.get(k), default=str) for r in runs}) > 1
    ]
    named = []
    for members in groups.values():
        s = members[0].settings
        # A key this group lacks (FedAvg has no proximal_mu) says nothing; a `_target_` is
        # named by its class (strategy=FedProx), the way a reader knows it.
        parts = [
            f"{k.removesuffix('._target_')}={str(s[k]).rsplit('.', 1)[-1]}"
            if k.endswith("._target_")
            else f"{k}={s[k]}"
            for k in varying
            if s.get(k) is not None
        ]
        named.append((", ".join(parts) or "all runs", members))
    return sorted(named)


def summarise(runs: Sequence[Run], target: float) -> list[dict[str, Any]]:
    """One row per group: mean and std over its finished runs, and how many runs it has."""
    rows = []
    for name, members in group_runs(runs):
        done = [r for r in members if r.status == "finished"]
        row: dict[str, Any] = {
            "group": name,
            "runs": len(done),
            "seeds": " ".join(str(r.seed) for r in done),
            "not_finished": len(members) - len(done),
        }
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
        # Differential privacy: the run's final epsilon (client-level, else the largest DP-SGD
        # epsilon of any client) at the delta of its config.
        row["epsilon_mean"], row["epsilon_std"] = _mean_std(
            [float(r.summary["epsilon"]) for r in done if r.summary.get("epsilon") is not None]
        )
        deltas = {r.summary["privacy"]["delta"] for r in done if "privacy" in r.summary}
        row["delta"] = deltas.pop() if len(deltas) == 1 else None
        rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def format_markdown(rows: Sequence[dict[str, Any]], runs: Sequence[Run], target: float) -> str:
    """The table a paper could use, plus the runs that were left out and why."""
    # The epsilon column appears only when some run used differential privacy.
    private = any(r.get("epsilon_mean") is not None or r.get("delta") for r in rows)
    lines = [
        f"| group | runs | test acc. (final) | test acc. at best val. | rounds to {target:g} | "
        "GB moved | wall s |" + (" ε (δ) |" if private else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if private else ""),
    ]
    for r in rows:
        reach = f"{_pm(r['rounds_to_target_mean'], r['rounds_to_target_std'], '{:.1f}')} "
        reach += f"({r['reached_target']}/{r['runs']})"
        gb = "-" if r["bytes_mean"] is None else f"{r['bytes_mean'] / 1e9:.2f}"
        eps = ""
        if private:
            eps = f" {_pm(r.get('epsilon_mean'), r.get('epsilon_std'), '{:.2f}')}"
            eps += f" ({r['delta']:g}) |" if r.get("delta") else " |"
        lines.append(
            f"| {r['group']} | {r['runs']} | "
            f"{_pm(r['test_accuracy_final_mean'], r['test_accuracy_final_std'])} | "
            f"{_pm(r['test_accuracy_at_best_val_mean'], r['test_accuracy_at_best_val_std'])} | "
            f"{reach} | {gb} | {_pm(r['wall_s_mean'], r['wall_s_std'], '{:.0f}')} |" + eps
        )
    left_out = [r for r in runs if r.status != "finished"]
    if left_out:
        lines += ["", "Not averaged (not finished):"]
        lines += [
            f"- {r.path}: {r.status}" + (f" ({r.error})" if r.error else "") for r in left_out
        ]
    return "\n".join(lines) + "\n"


def plot_groups(runs: Sequence[Run], path: Path) -> Path:
    """Test accuracy per round per group: the mean over seeds, with a band of ± one std."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, members) in enumerate(group_runs(runs)):
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
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        # Below the axes: group names are long, and a sweep has many of them.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(paths: Sequence[Path], out: Path, *, target: float = 0.5) -> str:
    """Read the runs under ``paths``; write the markdown table, the CSV and the plot to ``out``."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    rows = summarise(runs, target)
    text = format_markdown(rows, runs, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / C.REPORT_MD).write_text(text)
    with (out / C.REPORT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["group"])
        writer.writeheader()
        writer.writerows(rows)
    plot_groups(runs, out / C.REPORT_PLOT)
    return text
