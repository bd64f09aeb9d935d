"""Accuracy and loss curves of a run (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt


def plot_curves(records: Sequence[dict], path: Path, *, title: str = "") -> Path:
    """Plot test accuracy and test/train loss per round from ``metrics.jsonl`` records.

    Parameters
    ----------
    records : per-round dicts with ``round`` and optionally ``accuracy``, ``loss``, ``train_loss``.
    path : where the PNG goes.
    title : figure title (e.g. the experiment name).
    """
    evaluated = [r for r in records if r.get("accuracy") is not None]
    trained = [r for r in records if r.get("train_loss") is not None]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="global model accuracy", ylim=(0, 1))
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(
        [r["round"] for r in evaluated], [r["loss"] for r in evaluated], marker="o", label="test"
    )
    ax_loss.plot(
        [r["round"] for r in trained],
        [r["train_loss"] for r in trained],
        marker="x",
        label="train (clients, weighted)",
    )
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
