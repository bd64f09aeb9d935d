"""Image decoding: any ImageNet file to RGB, shorter-side resize + centre crop, header probes.

This module imports only numpy and PIL (never torch) so that the worker processes of
``data check`` / ``data prepare`` / ``data generate`` start fast under the ``spawn`` method.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedvision.errors import FedvisionError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

# Pillow raises these for files that are not images, truncated or corrupt.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError)


class UnreadableImageError(FedvisionError):
    """An image file that cannot be decoded (corrupt, truncated or not an image)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}; delete or replace the file "
            "(`fedvision data check` lists every unreadable file)"
        )


def is_image_file(name: str) -> bool:
    """Return True when ``name`` has an accepted image extension (.jpeg/.jpg/.png, any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale PNGs: Pillow's convert("RGB") clips instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike[str], draft_size: int | None = None) -> Image.Image:
    """Decode an image file as RGB, whatever its mode (L, CMYK, P, RGBA, 16-bit) or extension.

    Parameters
    ----------
    path
        Image file. Pillow detects the format from the content, so PNGs named ``.JPEG`` work.
    draft_size
        If given, let the JPEG decoder downscale by a power of two while keeping both sides
        ``>= draft_size`` (DCT scaling: several times faster on full-size ImageNet photos).

    Raises
    ------
    UnreadableImageError
        The file is missing, truncated, corrupt or not an image.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, str(exc)) from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


def probe(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]]:
    """Read only the header of an image: ``(mode, (width, height))`` without decoding pixels.

    Raises
    ------
    UnreadableImageError
        The file is not a recognisable image.
    """
    try:
        with Image.open(path) as img:
            return img.mode, (int(img.size[0]), int(img.size[1]))
    except _DECODE_ERRORS as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (antialiased bicubic), then centre-crop a square.

    The geometry matches ``torchvision.transforms.Resize(size)`` + ``CenterCrop(size)`` on PIL
    images (torchvision calls the same Pillow resize); done here directly so that workers need
    no torch.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``[3, size, size]`` (channels first, like a torch image tensor).
    """
    if size <= 0:
        raise FedvisionError(f"image size must be a positive number of pixels, got {size}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_resized(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode ``path`` and return it resized / centre-cropped: uint8 ``[3, size, size]``.

    This is the one function that ``data prepare`` uses per file (so tests can compare with it).
    """
    return resize_center_crop(load_rgb(path, draft_size=size), size)


def decode_chunk_into(
    paths: Sequence[str],
    start: int,
    array_path: str,
    total: int,
    size: int,
) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start:start+len(paths)`` of the uint8 memmap ``array_path``.

    Runs in a worker process; writes directly into the shared file so that no pixels travel back
    through a pipe. Returns ``(row, reason)`` for every file that could not be decoded (its row is
    left as zeros and is dropped when the cache is compacted).
    """
    out = np.memmap(array_path, dtype=np.uint8, mode="r+", shape=(total, 3, size, size))
    failed: list[tuple[int, str]] = []
    try:
        for offset, path in enumerate(paths):
            try:
                out[start + offset] = decode_resized(path, size)
            except UnreadableImageError as exc:
                failed.append((start + offset, exc.reason))
        out.flush()
    finally:
        del out
    return failed


def probe_chunk(
    paths: Sequence[str], header_only: bool
) -> tuple[dict, dict, list[tuple[str, str]]]:
    """Statistics of a chunk of files for ``data check``: modes, sizes, unreadable files.

    Returns
    -------
    tuple
        ``(modes {mode: count}, sizes {(w, h): count}, [(path, reason), ...])``; aggregated per
        chunk so that no per-file results cross the process boundary.
    """
    modes: dict[str, int] = {}
    sizes: dict[tuple[int, int], int] = {}
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            if header_only:
                try:
                    mode, wh = probe(path)
                except UnreadableImageError as exc:
                    bad.append((str(path), exc.reason))
                    continue
            else:
                with Image.open(path) as img:
                    mode, wh = img.mode, (int(img.size[0]), int(img.size[1]))
                    img.load()
        except Image.DecompressionBombError as exc:
            bad.append((str(path), str(exc)))
            continue
        except _DECODE_ERRORS as exc:
            bad.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        modes[mode] = modes.get(mode, 0) + 1
        sizes[wh] = sizes.get(wh, 0) + 1
    return modes, sizes, bad


def default_workers(workers: int | None) -> int:
    """Resolve a ``workers`` argument: ``None`` means one per available CPU core (at most 16)."""
    if workers is None:
        try:
            return max(1, min(16, len(os.sched_getaffinity(0))))
        except AttributeError:  # macOS has no sched_getaffinity
            return max(1, min(16, os.cpu_count() or 1))
    if workers < 0:
        raise FedvisionError(f"workers must be >= 0 (0 or 1 = no worker processes), got {workers}")
    return max(1, workers)


def as_path(p: str | os.PathLike[str]) -> Path:
    """Return ``p`` as an absolute, user-expanded Path (helper shared by the data modules)."""
    return Path(p).expanduser().absolute()


def map_chunks(
    fn: Callable[..., Any], tasks: Iterable[tuple], workers: int
) -> Iterator[tuple[tuple, Any]]:
    """Run ``fn(*task)`` for every task and yield ``(task, result)`` as results arrive.

    With ``workers <= 1`` everything runs in this process (no pickling, easy to debug and to
    monkeypatch in tests). Otherwise a ``spawn`` process pool runs at most ``4 * workers`` tasks
    at a time, so that millions of files never turn into millions of queued futures. The first
    exception cancels what has not started and is re-raised.
    """
    if workers <= 1:
        for task in tasks:
            yield task, fn(*task)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would inherit.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: dict[Future, tuple] = {}
        task_iter = iter(tasks)
        try:
            while True:
                while len(pending) < 4 * workers:
                    task = next(task_iter, None)
                    if task is None:
                        break
                    pending[pool.submit(fn, *task)] = task
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    yield task, fut.result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
