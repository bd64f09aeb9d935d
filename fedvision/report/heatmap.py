"""Client x class heatmap of a partition, with a side bar plot of client sizes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

MAX_CELLS_PER_AXIS = 200  # beyond this, neighbouring rows/columns are summed into bins
MAX_TICK_LABELS = 30  # beyond this, ticks are numeric and sparse
MAX_ANNOTATED_CELLS = 400  # small matrices also print each count in its cell


def _bin_axis(counts: np.ndarray, axis: int, max_bins: int) -> tuple[np.ndarray, int]:
    """Sum consecutive blocks along ``axis`` so that at most ``max_bins`` remain."""
    n = counts.shape[axis]
    width = -(-n // max_bins)
    if width <= 1:
        return counts, 1
    return np.add.reduceat(counts, np.arange(0, n, width), axis=axis), width


def plot_partition_heatmap(
    counts: np.ndarray,
    path: Path,
    *,
    class_names: list[str] | None = None,
    title: str = "",
) -> Path:
    """Draw the client x class sample counts as a PNG heatmap.

    Clients are on the y axis and classes on the x axis; a bar plot on the right shows each
    client's size. Above ``MAX_CELLS_PER_AXIS`` clients or classes, consecutive ones are summed
    into bins (the axis label says how many per bin).

    Parameters
    ----------
    counts : np.ndarray
        Non-negative [clients, classes] sample counts (e.g. from ``client_class_counts``).
    path : Path
        PNG file to write; its folder is created.
    class_names : list[str], optional
        Tick labels of the classes, used when there are few classes.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(
            f"counts must be a non-empty 2-D [clients, classes] array, got {counts.shape}"
        )
    num_clients, num_classes = counts.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    shown, client_bin = _bin_axis(counts, 0, MAX_CELLS_PER_AXIS)
    shown, class_bin = _bin_axis(shown, 1, MAX_CELLS_PER_AXIS)
    sizes = shown.sum(axis=1)
    rows, cols = shown.shape

    fig, (ax, ax_size) = plt.subplots(
        1,
        2,
        figsize=(min(4 + 0.45 * cols, 14), min(2.5 + 0.35 * rows, 11)),
        sharey=True,
        gridspec_kw={"width_ratios": [4, 1], "wspace": 0.05},
        layout="constrained",
    )
    image = ax.imshow(
        shown, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest", origin="upper"
    )
    fig.colorbar(image, ax=ax, location="left", pad=0.02, label="samples")

    if rows * cols <= MAX_ANNOTATED_CELLS:
        threshold = shown.max() / 2
        for (i, j), value in np.ndenumerate(shown):
            ax.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value > threshold else "white",
            )

    if cols <= MAX_TICK_LABELS and class_bin == 1:
        ax.set_xticks(range(cols))
        labels = class_names if class_names is not None else [str(c) for c in range(cols)]
        ax.set_xticklabels(labels, rotation=90 if class_names is not None else 0)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{int(x) * class_bin}")
    if rows <= MAX_TICK_LABELS and client_bin == 1:
        ax.set_yticks(range(rows))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.yaxis.set_major_formatter(lambda y, _pos: f"{int(y) * client_bin}")
    ax.set_xlabel("class" if class_bin == 1 else f"class (bins of {class_bin})")
    ax.set_ylabel("client" if client_bin == 1 else f"client (bins of {client_bin})")

    ax_size.barh(np.arange(rows), sizes, height=0.8 if rows <= 50 else 1.0, color="tab:blue")
    ax_size.set_xlabel("samples")
    ax_size.set_title("client size" if client_bin == 1 else "bin size", fontsize=9)
    ax_size.tick_params(axis="y", left=False)
    ax_size.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax_size.grid(axis="x", alpha=0.3)

    fig.suptitle(title or f"{num_clients} clients x {num_classes} classes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
