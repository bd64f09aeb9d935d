"""Accuracy and loss curves of a run (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt


def plot_curves(
    records: Sequence[dict], path: Path, *, title: str = "", x_label: str = "round"
) -> Path:
    """Plot accuracy (validation and test) and loss per round from ``metrics.jsonl`` records.

    Parameters
    ----------
    records : per-round dicts with ``round`` and optionally ``test_accuracy``, ``test_loss``,
        ``val_accuracy``, ``val_loss``, ``client_val_accuracy``, ``client_val_loss``,
        ``train_loss``.
    path : where the PNG goes.
    title : figure title (e.g. the experiment name).
    x_label : what ``round`` counts (``epoch`` for centralised pretraining).
    """
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    curves = (
        ("test", "test_accuracy", "test_loss", "o"),
        ("validation (server)", "val_accuracy", "val_loss", "s"),
        ("validation (clients)", "client_val_accuracy", "client_val_loss", "^"),
    )
    for label, acc_key, loss_key, marker in curves:
        acc = [(r["round"], r[acc_key]) for r in records if r.get(acc_key) is not None]
        loss = [(r["round"], r[loss_key]) for r in records if r.get(loss_key) is not None]
        if acc:
            ax_acc.plot(*zip(*acc, strict=True), marker=marker, label=label)
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), marker=marker, label=label)
    trained = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if trained:
        ax_loss.plot(*zip(*trained, strict=True), marker="x", label="train (clients, weighted)")
    ax_acc.set(xlabel=x_label, ylabel="accuracy", title="model accuracy", ylim=(0, 1))
    ax_loss.set(xlabel=x_label, ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
