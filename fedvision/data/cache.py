"""``fedvision data prepare``: decode every image once into a uint8 memory-mapped cache.

Layout of a cache folder::

    <out>/progress.jsonl          header + one line per finished chunk (resumable prepare)
    <out>/<split>/images.u8       raw uint8 memmap [N, 3, size, size]
    <out>/<split>/labels.npy      int64 [N]
    <out>/<split>/meta.json       written last: its presence marks the split as complete

Clients open a split read-only (``DecodedCache.open``) so that every process on a machine shares
the same page cache instead of holding its own copy of the pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedvision.atomic import write_json_atomic
from fedvision.constants import CACHE_IMAGES, CACHE_LABELS, CACHE_META, CACHE_PROGRESS
from fedvision.data.folder import ClassSelection, ScannedSplit, read_class_names, scan_dataset
from fedvision.data.images import as_path, decode_chunk_into, default_workers, map_chunks
from fedvision.errors import FedvisionError
from fedvision.paths import cache_root

CACHE_FORMAT = 1
PREPARE_CHUNK = 256  # images per resumable unit of work
_PARTIAL = "images.partial.u8"  # rows in source order, holes where decoding failed
_COPY_BLOCK = 2048  # rows per copy while compacting

_RUN_PREPARE = "run `fedvision data prepare <dataset root>` to (re)build it"


@dataclass(frozen=True)
class SkippedFile:
    """An image that ``prepare_dataset`` could not decode and left out of the cache."""

    split: str
    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class DecodedCache:
    """One prepared split: read-only uint8 images ``[N, 3, size, size]`` and int64 labels."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    class_names: list[str]
    size: int
    meta: dict

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DecodedCache:
        """Open a split folder written by ``prepare_dataset`` (memory-mapped, ``mode="r"``).

        Raises
        ------
        FedvisionError
            The folder is missing, half-written (no meta.json) or inconsistent.
        """
        path = as_path(path)
        meta_path = path / CACHE_META
        if not meta_path.is_file():
            what = "does not exist" if not path.exists() else "is not a complete decoded cache"
            raise FedvisionError(f"{path} {what} (no {CACHE_META}); {_RUN_PREPARE}")
        try:
            meta = json.loads(meta_path.read_text())
            n, size = int(meta["count"]), int(meta["size"])
            classes = list(meta["classes"])
            fmt = meta.get("format")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedvisionError(f"{meta_path} is unreadable ({exc}); {_RUN_PREPARE}") from exc
        if fmt != CACHE_FORMAT:
            raise FedvisionError(
                f"{path} has cache format {fmt}, not {CACHE_FORMAT}; {_RUN_PREPARE}"
            )
        img_path, lab_path = path / CACHE_IMAGES, path / CACHE_LABELS
        expected = n * 3 * size * size
        actual = img_path.stat().st_size if img_path.is_file() else None
        if actual != expected:
            raise FedvisionError(
                f"{img_path} holds {actual} bytes, meta.json expects {expected}; {_RUN_PREPARE}"
            )
        try:
            labels = np.load(lab_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FedvisionError(f"{lab_path} is unreadable ({exc}); {_RUN_PREPARE}") from exc
        if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= len(classes))):
            raise FedvisionError(f"{lab_path} does not match {CACHE_META}; {_RUN_PREPARE}")
        images = (
            np.memmap(img_path, dtype=np.uint8, mode="r", shape=(n, 3, size, size))
            if n
            else np.zeros((0, 3, size, size), dtype=np.uint8)
        )
        return cls(
            path=path,
            images=images,
            labels=labels.astype(np.int64, copy=False),
            classes=classes,
            class_names=list(meta.get("class_names") or classes),
            size=size,
            meta=meta,
        )


@dataclass
class PreparedDataset:
    """The result of ``prepare_dataset``: a cache folder with its splits."""

    path: Path
    classes: list[str]
    train: DecodedCache | None = None
    val: DecodedCache | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    reused: bool = False
    decoded: int = 0  # images decoded by this call (0 when everything was reused)
    seconds: float = 0.0

    def splits(self) -> dict[str, DecodedCache]:
        """The prepared splits by name."""
        return {n: c for n, c in (("train", self.train), ("val", self.val)) if c is not None}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PreparedDataset:
        """Open a complete cache folder (every split folder with a meta.json)."""
        path = as_path(path)
        found = {s: DecodedCache.open(path / s) for s in ("train", "val") if (path / s).is_dir()}
        if not found:
            raise FedvisionError(f"{path} holds no prepared split; {_RUN_PREPARE}")
        first = next(iter(found.values()))
        skipped = [
            SkippedFile(s, d["path"], d["reason"])
            for s, c in found.items()
            for d in c.meta.get("skipped", [])
        ]
        return cls(
            path=path,
            classes=first.classes,
            train=found.get("train"),
            val=found.get("val"),
            skipped=skipped,
            reused=True,
        )


# --- fingerprints ---------------------------------------------------------------------------------


def split_fingerprint(
    root: Path,
    split: str,
    scanned: ScannedSplit,
    size: int,
    selection: ClassSelection | None,
    max_per_class: int | None,
) -> str:
    """Hash of what a split's cache depends on: files (path, size, mtime), labels, options."""
    h = hashlib.sha256()
    head = {
        "format": CACHE_FORMAT,
        "split": split,
        "size": size,
        "selection": (selection or ClassSelection()).to_dict(),
        "max_per_class": max_per_class,
        "classes": scanned.classes,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for path, label in zip(scanned.files, scanned.labels.tolist(), strict=True):
        try:
            st = path.stat()
        except OSError as exc:
            raise FedvisionError(f"cannot stat {path}: {exc.strerror}") from exc
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()


def _dataset_fingerprint(split_fps: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(split_fps, sort_keys=True).encode()).hexdigest()


def default_cache_dir(root: Path, fingerprint: str, size: int) -> Path:
    """``cache_root() / f"{root.name}-{fingerprint[:12]}-{size}px"``."""
    return cache_root() / f"{as_path(root).name}-{fingerprint[:12]}-{size}px"


# --- prepare --------------------------------------------------------------------------------------


def _read_progress(path: Path) -> tuple[dict | None, list[dict]]:
    """Header and chunk records of a progress file; a torn last line (crash) is ignored."""
    if not path.is_file():
        return None, []
    header, records = None, []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if header is None:
            header = rec
        elif isinstance(rec, dict) and "chunk" in rec:
            records.append(rec)
    return header, records


def _rewrite_progress(path: Path, records: list[dict], header: dict | None = None) -> None:
    """Rewrite the progress log with ``header`` (default: the current one) and ``records``."""
    if header is None:
        header, _ = _read_progress(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(header) + "\n")
        fh.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def _meta_fingerprint(split_dir: Path) -> str | None:
    try:
        return json.loads((split_dir / CACHE_META).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _check_out_folder(out: Path, header: dict | None, fps: dict[str, str], overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` wipe) an ``out`` folder that belongs to another source."""
    if not out.exists() or not any(out.iterdir()):
        return
    ours = header is not None and header.get("kind") == "fedvision-cache"
    ours = ours or any((out / s / CACHE_META).is_file() for s in ("train", "val"))
    header = header or {}
    stale = []
    if ours:
        for split, fp in fps.items():
            old = _meta_fingerprint(out / split) or header.get("splits", {}).get(split)
            if old is not None and old != fp:
                stale.append(split)
    if ours and not stale:
        return
    if not ours:
        # Never deleted, even with overwrite: it may be anything of the user's.
        raise FedvisionError(
            f"{out} exists and is not a fedvision cache; choose another --out or delete it"
        )
    if overwrite:
        shutil.rmtree(out)
        return
    raise FedvisionError(
        f"the cache in {out} was built from other files or options (split {', '.join(stale)}: "
        "fingerprint differs); delete it, choose another --out, or pass overwrite=True "
        "(--overwrite) to rebuild it"
    )


def prepare_dataset(
    root: Path,
    out: Path | None = None,
    *,
    size: int = 64,
    selection: ClassSelection | None = None,
    max_per_class: int | None = None,
    splits: Sequence[str] = ("train", "val"),
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    chunk_size: int = PREPARE_CHUNK,
) -> PreparedDataset:
    """Decode, resize (shorter side) and centre-crop every image once into a memory-mapped cache.

    Resumable: work is done in chunks of ``chunk_size`` images, each recorded in
    ``progress.jsonl`` when finished; an interrupted call continues where it stopped. A split's
    ``meta.json`` is written last, so a half-written split is never taken as complete. Files that
    cannot be decoded are skipped, listed in ``meta.json`` and in the result, and the arrays are
    compacted (no holes). A complete cache with the same fingerprint is reused without decoding.

    Stale caches are refused, not rebuilt silently: if ``out`` holds a cache of other files or
    options (different fingerprint), a FedvisionError says so unless ``overwrite=True``, which
    deletes and rebuilds it. (The default ``out`` contains the fingerprint, so it is never stale.)

    Parameters
    ----------
    root
        ImageNet-style dataset folder.
    out
        Cache folder; default ``default_cache_dir(root, fingerprint, size)``.
    size
        Side of the square images in the cache.
    selection, max_per_class
        Which classes and how many images per class (see ``scan_split``).
    splits
        Which splits to prepare; they must have the same classes.
    workers
        Decoding processes (default one per CPU core; 0 or 1: in this process).
    progress
        Show a progress bar on stderr.
    overwrite
        Rebuild a stale cache in ``out`` instead of refusing.
    chunk_size
        Images per resumable chunk (a resumed run keeps the chunk size it started with).
    """
    t0 = time.perf_counter()
    if size < 8:
        raise FedvisionError(f"cache image size must be at least 8 pixels, got {size}")
    if not splits:
        raise FedvisionError("give at least one split to prepare (e.g. train, val)")
    bad_splits = [s for s in splits if s not in ("train", "val")]
    if bad_splits:
        raise FedvisionError(f"unknown split(s) {bad_splits}; use train and/or val")
    root = as_path(root)
    scanned = scan_dataset(root, tuple(splits), selection, max_per_class)
    fps = {
        s: split_fingerprint(root, s, sc, size, selection, max_per_class)
        for s, sc in scanned.items()
    }
    dataset_fp = _dataset_fingerprint(fps)
    out = as_path(out) if out is not None else default_cache_dir(root, dataset_fp, size)
    progress_path = out / CACHE_PROGRESS
    header, _ = _read_progress(progress_path)
    _check_out_folder(out, header, fps, overwrite)

    names = read_class_names(root)
    classes = next(iter(scanned.values())).classes
    common = {
        "format": CACHE_FORMAT,
        "source_root": str(root),
        "dataset_fingerprint": dataset_fp,
        "size": size,
        "classes": classes,
        "class_names": [names.get(c, c) for c in classes],
        "selection": (selection or ClassSelection()).to_dict(),
        "max_per_class": max_per_class,
    }

    result = PreparedDataset(path=out, classes=classes)
    todo = {}
    for split, sc in scanned.items():
        if _meta_fingerprint(out / split) == fps[split]:
            try:
                setattr(result, split, DecodedCache.open(out / split))
                continue
            except FedvisionError:
                pass  # inconsistent despite its meta.json: rebuild that split
        todo[split] = sc
    if not todo:
        result.reused = True
    else:
        out.mkdir(parents=True, exist_ok=True)
        header, records = _read_progress(progress_path)
        if header is None or header.get("splits") != fps:
            # New run (or new split set): start a fresh progress log for the splits to do.
            header = {"kind": "fedvision-cache", "splits": fps, "chunk_size": chunk_size}
            records = [r for r in records if r.get("split") not in todo]
            _rewrite_progress(progress_path, records, header)
        chunk = int(header["chunk_size"])
        for split in todo:
            # A leftover meta.json (inconsistent split) must not mark a rebuild as complete.
            (out / split / CACHE_META).unlink(missing_ok=True)
        decoded = _decode_splits(out, todo, records, size, chunk, workers, progress)
        result.decoded = decoded
        for split, sc in todo.items():
            _finalise_split(out / split, split, sc, fps[split], records, common)
            setattr(result, split, DecodedCache.open(out / split))
    for split, cache in result.splits().items():
        result.skipped.extend(
            SkippedFile(split, d["path"], d["reason"]) for d in cache.meta.get("skipped", [])
        )
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def _decode_splits(
    out: Path,
    todo: dict[str, ScannedSplit],
    records: list[dict],
    size: int,
    chunk: int,
    workers: int | None,
    progress: bool,
) -> int:
    """Decode the chunks of ``todo`` not in ``records``; log each finished chunk."""
    row_bytes = 3 * size * size
    tasks = []
    total = done_before = 0
    for split, sc in todo.items():
        n = len(sc.files)
        total += n
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        partial = split_dir / _PARTIAL
        finished = {r["chunk"] for r in records if r.get("split") == split}
        if not partial.is_file() or partial.stat().st_size != n * row_bytes:
            # A missing or wrong-sized partial array cannot hold finished chunks: start over.
            records[:] = [r for r in records if r.get("split") != split]
            _rewrite_progress(out / CACHE_PROGRESS, records)
            finished = set()
            # Opened in w+ mode, numpy creates a sparse file of the full size: no hole is written.
            np.memmap(partial, dtype=np.uint8, mode="w+", shape=(max(n, 1), 3, size, size)).flush()
            if n == 0:
                partial.write_bytes(b"")
        for k, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            if k in finished:
                done_before += stop - start
                continue
            paths = [str(p) for p in sc.files[start:stop]]
            tasks.append((split, k, paths, start, str(partial), n, size))
    decoded = 0
    with (
        tqdm(
            total=total,
            initial=done_before,
            desc="prepare",
            unit="img",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
        (out / CACHE_PROGRESS).open("a") as log,
    ):
        for task, failed in map_chunks(_decode_task, tasks, default_workers(workers)):
            split, k, paths = task[0], task[1], task[2]
            rec = {"split": split, "chunk": k, "failed": failed}
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            decoded += len(paths)
            bar.update(len(paths))
    return decoded


def _decode_task(
    split: str, k: int, paths: list[str], start: int, partial: str, n: int, size: int
) -> list[tuple[int, str]]:
    return decode_chunk_into(paths, start, partial, n, size)


def _finalise_split(
    split_dir: Path,
    split: str,
    sc: ScannedSplit,
    fingerprint: str,
    records: list[dict],
    common: dict,
) -> None:
    """Compact the partial array (drop failed rows), write labels, then meta.json last."""
    n = len(sc.files)
    size = int(common["size"])
    failed: dict[int, str] = {}
    for r in records:
        if r.get("split") == split:
            failed.update({int(row): str(reason) for row, reason in r["failed"]})
    keep = np.ones(n, dtype=bool)
    keep[list(failed)] = False
    n_keep = int(keep.sum())
    partial, final = split_dir / _PARTIAL, split_dir / CACHE_IMAGES
    row_bytes = 3 * size * size
    if partial.is_file():
        if n_keep == n:
            os.replace(partial, final)
        else:
            src = np.memmap(partial, dtype=np.uint8, mode="r", shape=(n, 3, size, size))
            kept_rows = np.flatnonzero(keep)
            if n_keep:
                dst = np.memmap(final, dtype=np.uint8, mode="w+", shape=(n_keep, 3, size, size))
                for i in range(0, n_keep, _COPY_BLOCK):
                    dst[i : i + _COPY_BLOCK] = src[kept_rows[i : i + _COPY_BLOCK]]
                dst.flush()
                del dst
            else:
                final.write_bytes(b"")
            del src
            partial.unlink()
    elif not final.is_file() or final.stat().st_size != n_keep * row_bytes:
        raise FedvisionError(f"{split_dir} lost its image array mid-prepare; {_RUN_PREPARE}")
    labels = sc.labels[keep]
    np.save(split_dir / CACHE_LABELS, labels)
    counts = np.bincount(labels, minlength=len(sc.classes))
    meta = {
        **common,
        "split": split,
        "fingerprint": fingerprint,
        "count": n_keep,
        "shape": [n_keep, 3, size, size],
        "dtype": "uint8",
        "counts_per_class": {c: int(k) for c, k in zip(sc.classes, counts, strict=True)},
        "skipped": [{"path": str(sc.files[row]), "reason": failed[row]} for row in sorted(failed)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(split_dir / CACHE_META, meta)


# --- torch dataset --------------------------------------------------------------------------------


class CachedImageDataset(torch.utils.data.Dataset):
    """A torch Dataset over a ``DecodedCache``: uint8 ``[3, H, W]`` tensors and int labels.

    Pickling sends only the cache path and the indices; each process reopens the memmap lazily,
    so DataLoader workers share the page cache instead of copying the array. ``__getitems__``
    returns a whole batch ``(uint8 [B, 3, H, W], int64 [B])``; use ``collate_fn=batch_collate``
    with a DataLoader, since torch passes that batch through ``collate_fn``.
    """

    def __init__(
        self,
        cache: DecodedCache,
        indices: np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._path = cache.path
        self._cache: DecodedCache | None = cache
        n = len(cache)
        self.indices = (
            np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise FedvisionError(f"dataset indices out of range for a cache of {n} images")
        self.transform = transform

    @property
    def cache(self) -> DecodedCache:
        """The opened cache (reopened lazily after unpickling)."""
        if self._cache is None:
            self._cache = DecodedCache.open(self._path)
        return self._cache

    @property
    def labels(self) -> np.ndarray:
        """Labels of this dataset's images, in dataset order."""
        return self.cache.labels[self.indices]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        # np.array copies out of the read-only memmap (torch refuses non-writable buffers).
        img = torch.from_numpy(np.array(self.cache.images[j]))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.cache.labels[j])

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.indices[np.asarray(idx, dtype=np.int64)]
        # Fancy indexing on the memmap already returns a fresh, writable copy.
        images = torch.from_numpy(self.cache.images[rows])
        if self.transform is not None:
            images = torch.stack([self.transform(x) for x in images])
        return images, torch.from_numpy(self.cache.labels[rows])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


def batch_collate(batch: Any) -> Any:
    """Identity ``collate_fn`` for DataLoaders over ``CachedImageDataset`` (already batched)."""
    return batch


def format_prepare(prepared: PreparedDataset, max_skipped: int = 20) -> str:
    """Human-readable summary of ``prepare_dataset``'s result."""
    how = "reused" if prepared.reused else f"decoded {prepared.decoded} images"
    lines = [
        f"cache     {prepared.path}  ({how} in {prepared.seconds} s)",
        f"classes   {len(prepared.classes)}",
    ]
    for split, cache in prepared.splits().items():
        counts = list(cache.meta.get("counts_per_class", {}).values()) or [0]
        mib = cache.images.nbytes / 2**20
        lines.append(
            f"  {split:<6} {len(cache)} images at {cache.size}px ({mib:.1f} MiB); "
            f"per class min {min(counts)}, max {max(counts)}"
        )
    lines.append(f"skipped   {len(prepared.skipped)}")
    for s in prepared.skipped[:max_skipped]:
        lines.append(f"  [{s.split}] {s.path}: {s.reason}")
    if len(prepared.skipped) > max_skipped:
        lines.append(f"  ... and {len(prepared.skipped) - max_skipped} more (see meta.json)")
    return "\n".join(lines)
