"""``fedvision data check``: classes, counts, modes, sizes and unreadable files of a tree."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fedvision.data.folder import scan_split
from fedvision.data.images import as_path, default_workers, map_chunks, probe_chunk
from fedvision.errors import FedvisionError

SPLITS = ("train", "val")
CHECK_CHUNK = 512  # files per worker task: amortises the process round trip


@dataclass
class CheckReport:
    """What ``check_tree`` found. Sizes are kept as counts, never as one entry per file."""

    root: Path
    header_only: bool
    classes: list[str]
    per_class: dict[str, dict[str, int]]  # split -> wnid -> images
    modes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # (w, h) -> images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def images(self) -> int:
        """Total number of image files found (readable or not)."""
        return sum(sum(c.values()) for c in self.per_class.values())

    def size_stats(self) -> dict:
        """min / median / max of width and height, and the five most common sizes."""
        if not self.sizes:
            return {}
        out: dict = {}
        for axis, name in ((0, "width"), (1, "height")):
            counts = Counter()
            for wh, n in self.sizes.items():
                counts[wh[axis]] += n
            values = sorted(counts)
            # Lower median: an actual image size, not the mean of two.
            half, seen, median = (sum(counts.values()) - 1) // 2, 0, values[0]
            for v in values:
                seen += counts[v]
                if seen > half:
                    median = v
                    break
            out[name] = {"min": values[0], "median": median, "max": values[-1]}
        # Ties by size, not by the order the images were counted in (a process pool's order
        # varies from run to run): the same folder gives the same report.
        common = sorted(self.sizes.items(), key=lambda item: (-item[1], item[0]))[:5]
        out["most_common"] = [[w, h, n] for (w, h), n in common]
        return out

    def to_dict(self) -> dict:
        """JSON-friendly report (keys: root, classes, images, splits, modes, sizes, unreadable)."""
        return {
            "root": str(self.root),
            "header_only": self.header_only,
            "classes": len(self.classes),
            "images": self.images,
            "splits": {
                s: {"images": sum(c.values()), "classes": len(c), "per_class": dict(c)}
                for s, c in self.per_class.items()
            },
            "modes": dict(sorted(self.modes.items(), key=lambda item: (-item[1], item[0]))),
            "sizes": self.size_stats(),
            "unreadable": [p for p, _ in self.unreadable],
            "unreadable_reasons": {p: r for p, r in self.unreadable},
        }


def check_tree(
    root: Path,
    *,
    header_only: bool = False,
    workers: int | None = None,
    progress: bool = True,
    chunk_size: int = CHECK_CHUNK,
) -> CheckReport:
    """Scan every split present (train, val) and open every image once.

    Parameters
    ----------
    root
        ImageNet-style folder.
    header_only
        Read only file headers (mode and size); much faster, but truncated files go unnoticed.
    workers
        Worker processes (default one per CPU core; 0 or 1: in this process).
    progress
        Show a progress bar on stderr.
    chunk_size
        Files per worker task.

    Raises
    ------
    FedvisionError
        Missing root, no split folder, empty tree or empty class folder, split class mismatch.
    """
    root = as_path(root)
    if not root.is_dir():
        raise FedvisionError(f"dataset folder {root} does not exist; check the path")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise FedvisionError(
            f"{root} has neither train/ nor val/; expected {root}/train/<wnid>/<image>.JPEG"
        )
    scanned = {s: scan_split(root, s) for s in splits}
    classes = scanned[splits[0]].classes
    for s in splits[1:]:
        if scanned[s].classes != classes:
            diff = sorted(set(classes) ^ set(scanned[s].classes))
            raise FedvisionError(
                f"train and {s} of {root} have different classes (e.g. {', '.join(diff[:5])}); "
                "fix the tree or select common classes"
            )
    report = CheckReport(
        root=root,
        header_only=header_only,
        classes=classes,
        per_class={s: sc.counts() for s, sc in scanned.items()},
    )
    total = sum(len(sc.files) for sc in scanned.values())

    def tasks():
        for sc in scanned.values():
            for i in range(0, len(sc.files), chunk_size):
                yield [str(p) for p in sc.files[i : i + chunk_size]], header_only

    with tqdm(total=total, desc="check", unit="img", disable=not progress, file=sys.stderr) as bar:
        for task, (modes, sizes, bad) in map_chunks(probe_chunk, tasks(), default_workers(workers)):
            report.modes.update(modes)
            report.sizes.update(sizes)
            report.unreadable.extend(bad)
            bar.update(len(task[0]))
    report.unreadable.sort()
    return report


def format_report(report: CheckReport, max_classes: int = 10, max_bad: int = 50) -> str:
    """Human-readable summary of a ``CheckReport``."""
    d = report.to_dict()
    lines = [
        f"dataset   {d['root']}" + ("  (headers only)" if report.header_only else ""),
        f"classes   {d['classes']}",
        f"images    {d['images']}",
    ]
    for split, info in d["splits"].items():
        counts = sorted(info["per_class"].values())
        lines.append(
            f"  {split:<6} {info['images']} images; per class min {counts[0]}, max {counts[-1]}"
        )
        smallest = sorted(info["per_class"].items(), key=lambda kv: (kv[1], kv[0]))
        if counts[0] != counts[-1]:
            few = ", ".join(f"{w} {n}" for w, n in smallest[:max_classes])
            lines.append(f"         fewest: {few}")
    lines.append("modes     " + ", ".join(f"{m} {n}" for m, n in d["modes"].items()))
    sz = d["sizes"]
    if sz:
        lines.append(
            f"width     min {sz['width']['min']}  median {sz['width']['median']}  "
            f"max {sz['width']['max']}"
        )
        lines.append(
            f"height    min {sz['height']['min']}  median {sz['height']['median']}  "
            f"max {sz['height']['max']}"
        )
        lines.append("common    " + ", ".join(f"{w}x{h} ({n})" for w, h, n in sz["most_common"]))
    bad = report.unreadable
    lines.append(f"unreadable {len(bad)}")
    for path, reason in bad[:max_bad]:
        lines.append(f"  {path}: {reason}")
    if len(bad) > max_bad:
        lines.append(f"  ... and {len(bad) - max_bad} more (see --json)")
    return "\n".join(lines)
