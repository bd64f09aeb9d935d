"""Reading ImageNet-style folders: ``train/<wnid>/*``, ``val/<wnid>/*`` or a flat ``val/``.

A flat ``val/`` needs a ground-truth file, looked for in ``val/``, the root and the three folders
above it (Kaggle keeps it next to ``ILSVRC/``, the images in ``ILSVRC/Data/CLS-LOC``):

- ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, the wnid first),
- ``val_labels.txt`` or ``ILSVRC2012_val_labels.txt`` (``<filename> <wnid>`` per line),
- ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat`` of the devkit (needs scipy).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedvision.constants import (
    DEVKIT_GT,
    DEVKIT_META,
    KAGGLE_VAL_CSV,
    SYNSET_MAPPING,
    VAL_LABEL_FILES,
)
from fedvision.data.images import as_path, is_image_file
from fedvision.errors import FedvisionError


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


@dataclass(frozen=True)
class ClassSelection:
    """Which classes to use: the first ``first_n`` (sorted wnids) or an explicit wnid list.

    ``ClassSelection()`` selects every class.
    """

    first_n: int | None = None
    wnids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.first_n is not None and self.wnids is not None:
            raise FedvisionError("select classes either by first_n or by a wnid list, not both")
        if self.first_n is not None and self.first_n < 1:
            raise FedvisionError(f"first_n must be at least 1, got {self.first_n}")
        if self.wnids is not None and len(self.wnids) == 0:
            raise FedvisionError("the class list is empty; give at least one wnid")

    @classmethod
    def from_config(
        cls,
        first_n: int | None = None,
        wnids: list[str] | tuple[str, ...] | None = None,
        file: str | os.PathLike[str] | None = None,
    ) -> ClassSelection:
        """Build a selection from config values; ``file`` holds one wnid per line (# comments)."""
        if file is not None:
            if wnids is not None:
                raise FedvisionError(
                    "give the classes either as a wnid list or as a file, not both"
                )
            path = as_path(file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise FedvisionError(f"cannot read the class file {path}: {exc.strerror}") from exc
            wnids = [ln.split("#")[0].strip() for ln in lines]
            wnids = [w.split()[0] for w in wnids if w]
            if not wnids:
                raise FedvisionError(f"the class file {path} lists no wnid (one per line expected)")
        if wnids is not None:
            wnids = tuple(dict.fromkeys(str(w) for w in wnids))  # keep order, drop duplicates
        return cls(first_n=first_n, wnids=wnids)

    def apply(self, classes: list[str], where: str = "the dataset") -> list[str]:
        """Return the selected subset of ``classes`` (sorted)."""
        classes = sorted(classes)
        if self.first_n is not None:
            if self.first_n > len(classes):
                raise FedvisionError(
                    f"first_n={self.first_n} but {where} has only {len(classes)} classes"
                )
            return classes[: self.first_n]
        if self.wnids is not None:
            known = set(classes)
            unknown = [w for w in self.wnids if w not in known]
            if unknown:
                raise FedvisionError(
                    f"unknown class ids in the selection: {_few(unknown)}; {where} has "
                    f"{len(classes)} classes such as {_few(classes, 3)}"
                )
            return sorted(self.wnids)
        return classes

    def to_dict(self) -> dict:
        """JSON-friendly form (for fingerprints and meta files)."""
        return {"first_n": self.first_n, "wnids": list(self.wnids) if self.wnids else None}


@dataclass
class ScannedSplit:
    """One split of a folder tree: ``files[i]`` has label ``labels[i]`` (index in ``classes``)."""

    classes: list[str]
    files: list[Path]
    labels: np.ndarray = field(repr=False)

    def counts(self) -> dict[str, int]:
        """Number of images per class."""
        per = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, per, strict=True)}


def _list_dir(path: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, image file names) of ``path``, sorted; os.scandir to scale to ImageNet."""
    dirs, files = [], []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif is_image_file(entry.name) and entry.is_file():
                files.append(entry.name)
    return sorted(dirs), sorted(files)


def _root_and_kaggle_parents(root: Path) -> list[Path]:
    # Kaggle keeps LOC_*.csv/txt three levels above its ILSVRC/Data/CLS-LOC image root.
    return [root, *list(root.parents)[:3]]


def _find(root: Path, split_dir: Path, names: tuple[str, ...]) -> Path | None:
    for folder in (split_dir, *_root_and_kaggle_parents(root)):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_ground_truth(root: Path, split_dir: Path, files: list[str]) -> dict[str, str]:
    """Map each file name (and stem) of a flat split to its wnid."""
    csv_path = _find(root, split_dir, (KAGGLE_VAL_CSV,))
    if csv_path is not None:
        gt: dict[str, str] = {}
        try:
            with csv_path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    gt[row["ImageId"].strip()] = row["PredictionString"].split()[0]
        except (KeyError, IndexError, OSError, csv.Error) as exc:
            raise FedvisionError(
                f"{csv_path} is not a Kaggle val solution (columns ImageId,PredictionString): {exc}"
            ) from exc
        return gt
    txt = _find(root, split_dir, VAL_LABEL_FILES)
    if txt is not None:
        gt = {}
        for n, line in enumerate(txt.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise FedvisionError(f"{txt}:{n}: expected '<filename> <wnid>', got {line!r}")
            gt[parts[0]] = parts[1]
            gt.setdefault(Path(parts[0]).stem, parts[1])
        return gt
    devkit = _find(root, split_dir, (DEVKIT_GT, f"ILSVRC2012_devkit_t12/data/{DEVKIT_GT}"))
    if devkit is not None:
        return _read_devkit(devkit, files)
    raise FedvisionError(
        f"{split_dir} holds images directly but no ground truth was found; put "
        f"{KAGGLE_VAL_CSV} or val_labels.txt ('<filename> <wnid>' per line) in {root}, or sort "
        "the images into <wnid> sub-folders"
    )


def _read_devkit(gt_path: Path, files: list[str]) -> dict[str, str]:
    # torchvision's devkit parser needs the archive layout and torch; this reads the two files.
    meta = gt_path.parent / DEVKIT_META
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise FedvisionError(
            f"reading {gt_path.name} needs {DEVKIT_META} and scipy: `pip install scipy`, or "
            f"provide {KAGGLE_VAL_CSV} / val_labels.txt instead"
        ) from exc
    if not meta.is_file():
        raise FedvisionError(f"{gt_path} needs the devkit's {DEVKIT_META} next to it")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    idx_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = [int(x) for x in gt_path.read_text().split()]
    # The ground truth lists labels in the order of ILSVRC2012_val_00000001.JPEG, ...
    return {f"ILSVRC2012_val_{i:08d}": idx_to_wnid[c] for i, c in enumerate(ids, 1)}


def _split_dir(root: Path | str, split: str) -> Path:
    """``root/split``, or the one-line error that says which of the two is missing."""
    root = as_path(root)
    if not root.is_dir():
        raise FedvisionError(f"dataset folder {root} does not exist; check the path (data.root)")
    split_dir = root / split
    if not split_dir.is_dir():
        raise FedvisionError(
            f"{root} has no '{split}' folder; expected {root}/{split}/<wnid>/<image>.JPEG"
        )
    return split_dir


def selected_classes(
    root: Path, split: str = "train", selection: ClassSelection | None = None
) -> list[str] | None:
    """The class folders a run would use from ``root/split``, read from one directory listing.

    ``None`` when the split is flat (labels from a ground-truth file, counted when scanned). A
    cheap check before any process starts; :func:`scan_split` reads the images later.

    Raises
    ------
    FedvisionError
        The root or the split is missing, or the selection names unknown classes.
    """
    split_dir = _split_dir(root, split)
    dirs, _ = _list_dir(split_dir)
    if not dirs:
        return None
    return (selection or ClassSelection()).apply(dirs, where=str(split_dir))


def scan_split(
    root: Path,
    split: str,
    selection: ClassSelection | None = None,
    max_per_class: int | None = None,
) -> ScannedSplit:
    """List the images and labels of one split of an ImageNet-style tree.

    Parameters
    ----------
    root
        Folder holding ``train/`` and/or ``val/``.
    split
        Sub-folder name, e.g. ``"train"`` or ``"val"``.
    selection
        Which classes to keep (default all); labels are indices into the sorted kept classes.
    max_per_class
        Keep at most this many images per class (the first ones in file-name order).

    Raises
    ------
    FedvisionError
        Missing root or split, an empty tree, an empty class folder, unknown selected wnids, or a
        flat split without a ground-truth file.
    """
    root = as_path(root)
    split_dir = _split_dir(root, split)
    if max_per_class is not None and max_per_class < 1:
        raise FedvisionError(f"max_per_class must be at least 1, got {max_per_class}")
    selection = selection or ClassSelection()
    dirs, flat = _list_dir(split_dir)
    per_class: dict[str, list[Path]] = {}
    if dirs:
        for wnid in selection.apply(dirs, where=str(split_dir)):
            _, names = _list_dir(split_dir / wnid)
            if not names:
                raise FedvisionError(
                    f"class folder {split_dir / wnid} holds no .jpeg/.jpg/.png image; "
                    "remove the folder or add its images"
                )
            per_class[wnid] = [split_dir / wnid / n for n in names]
    elif flat:
        gt = _read_ground_truth(root, split_dir, flat)
        unlabelled = [n for n in flat if n not in gt and Path(n).stem not in gt]
        if unlabelled:
            raise FedvisionError(
                f"{len(unlabelled)} images in {split_dir} have no ground-truth label "
                f"({_few(unlabelled, 3)}); fix the ground-truth file"
            )
        by_class: dict[str, list[Path]] = {}
        for n in flat:
            by_class.setdefault(gt.get(n) or gt[Path(n).stem], []).append(split_dir / n)
        per_class = {w: by_class[w] for w in selection.apply(list(by_class), where=str(split_dir))}
    else:
        raise FedvisionError(
            f"{split_dir} is empty; expected {split}/<wnid>/<image>.JPEG (ImageNet layout)"
        )
    classes = sorted(per_class)
    files: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        kept = per_class[wnid][:max_per_class] if max_per_class else per_class[wnid]
        files.extend(kept)
        labels.extend([label] * len(kept))
    return ScannedSplit(classes=classes, files=files, labels=np.asarray(labels, dtype=np.int64))


def scan_dataset(
    root: Path,
    splits: tuple[str, ...] | list[str] = ("train", "val"),
    selection: ClassSelection | None = None,
    max_per_class: int | None = None,
) -> dict[str, ScannedSplit]:
    """Scan several splits and check that they have the same class list (after selection)."""
    scanned = {s: scan_split(root, s, selection, max_per_class) for s in splits}
    first = next(iter(scanned), None)
    for name, sp in scanned.items():
        if first is not None and sp.classes != scanned[first].classes:
            a, b = set(scanned[first].classes), set(sp.classes)
            diff = sorted(a ^ b)
            raise FedvisionError(
                f"splits '{first}' and '{name}' of {as_path(root)} have different classes "
                f"({len(a)} vs {len(b)}; differing: {_few(diff)}); select common classes"
            )
    return scanned


def read_class_names(root: Path) -> dict[str, str]:
    """Map wnid -> name from ``LOC_synset_mapping.txt`` (root or Kaggle root); {} if absent."""
    root = as_path(root)
    for folder in _root_and_kaggle_parents(root):
        path = folder / SYNSET_MAPPING
        if path.is_file():
            names = {}
            for line in path.read_text().splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    names[wnid] = name.strip()
            return names
    return {}
