"""Files that a crash, a full disk or a concurrent reader never sees half-done.

Whole files go through a temporary file in the same folder, ``fsync`` and a rename (and an
``fsync`` of the folder, so the rename itself survives a power cut). Every checkpoint (a run's,
pretraining's, compression's variants, a run's initial weights) is written by one function,
:func:`save_torch_atomic`. JSON-lines files are
appended one whole line per ``write`` and read back so that a line cut short by a crash (the
last one: appends only ever tear there) is dropped with a warning instead of failing the reader.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedvision.errors import FedvisionError


def fsync_dir(folder: Path) -> None:
    """``fsync`` a folder, so that a rename in it survives a power cut (where the OS allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder: the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file, then fsync and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_with(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, obj: object, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def save_torch_atomic(path: Path, obj: object) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (a checkpoint is never left half-written).

    Returns ``path``. The one writer of every checkpoint file: what a reader finds at ``path`` is
    either the previous file or the whole new one, never a prefix.
    """
    import torch

    write_with(path, lambda f: torch.save(obj, f))
    return Path(path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single ``write``, then fsync.

    One ``write`` on an ``O_APPEND`` descriptor puts the whole line at the end or, if the process
    dies inside it, a prefix of it, which :func:`read_jsonl` recognises and drops.
    """
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (empty when there is none).

    A last line that does not parse is a write cut short: it is dropped with one warning. A bad
    line anywhere else is damage no append makes, and raises :class:`FedvisionError`.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise FedvisionError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(numbered) - 1:
                raise FedvisionError(
                    f"{path}: line {lineno} is not JSON (the file was edited or damaged)"
                ) from None
            print(
                f"fedvision: warning: {path}: dropped a torn last line ({len(line)} characters "
                "of a write cut short)",
                file=sys.stderr,
            )
    return records
