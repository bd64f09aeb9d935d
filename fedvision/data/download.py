"""``fedvision data download``: Imagenette, Imagewoof (fastai) and CIFAR-10, verified and unpacked.

The archive is fetched into ``DIR/.partial/<archive>.part`` with HTTP Range requests, so that an
interrupted download continues where it stopped; then it is verified (the published checksum
where one is known, always a full read of the gzip/tar stream with every member's path checked)
and unpacked into a temporary folder inside ``DIR`` that is renamed into place at the end, so a
final folder is always complete. Its record file marks it complete: a second call skips it.

- Imagenette / Imagewoof: fastai's layout as is, ``DIR/imagenette2-160/{train,val}/<wnid>/*.JPEG``.
- CIFAR-10: the python archive converted into the same ImageNet-style tree of lossless PNGs,
  ``DIR/cifar10/{train,val}/<class>/<index>.png`` (val is the official test batch). The class
  names sort in label order (airplane = 0 ... truck = 9), so ImageFolder's labels are CIFAR's.

Without internet a user downloads the archive elsewhere and passes it with ``archive=`` (or
copies it into ``DIR/.partial/``); it is verified and unpacked the same way.

HTTP is urllib's (standard library): one GET with a Range header is all a resumable download
needs, and no extra dependency then has to install offline.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedvision import __version__
from fedvision.atomic import write_json_atomic, write_text_atomic
from fedvision.data.images import as_path
from fedvision.errors import FedvisionError

DATASETS = ("imagenette", "imagewoof", "cifar10")
FASTAI_SIZES = ("160", "320", "full")
FASTAI_BASE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TOP = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"

PARTIAL_DIR = ".partial"  # DIR/.partial/<archive>.part while downloading
DOWNLOAD_RECORD = "fedvision_download.json"  # inside the final folder; marks it complete

# Published checksums of the archives, by file name: (algorithm, hex digest), or None where none
# is published. A download with None is verified as a complete, well-formed archive instead, and
# its sha256 is printed and written to DIR/<archive>.sha256 so that a user can pin it here.
CHECKSUMS: MappingProxyType[str, tuple[str, str] | None] = MappingProxyType(
    {
        # Published on https://www.cs.toronto.edu/~kriz/cifar.html (torchvision's CIFAR10 agrees).
        "cifar-10-python.tar.gz": ("md5", "c58f30108f718f92721af3b95e74349a"),
        # fastai's page publishes none. These md5s are torchvision's (0.29.1,
        # torchvision/datasets/imagenette.py, _ARCHIVES); they were not checked against the
        # archives here (written offline).
        "imagenette2.tgz": ("md5", "fe2fc210e6bb7c5664d602c3cd71e612"),
        "imagenette2-320.tgz": ("md5", "3df6f0d01a2c9592104656642f5e78a3"),
        "imagenette2-160.tgz": ("md5", "e793b78cc4c9e9a4ccc0c1155377a412"),
        # No published checksum anywhere we could check; never guessed.
        "imagewoof2.tgz": None,
        "imagewoof2-320.tgz": None,
        "imagewoof2-160.tgz": None,
    }
)

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0  # per socket operation: a stalled server fails, a slow one does not
_MAX_STALLS = 5  # consecutive interrupted attempts that brought no new byte


@dataclass(frozen=True)
class Source:
    """One downloadable archive and the folder it becomes in ``DIR``."""

    dataset: str
    archive: str  # file name of the archive
    url: str
    top: str  # the archive's single top-level folder
    target: str  # the folder created in DIR
    # What a complete archive holds below ``top``: files, and non-empty folders ("train/").
    required: tuple[str, ...]
    convert_cifar: bool = False


@dataclass(frozen=True)
class DownloadResult:
    """What ``download_dataset`` did."""

    root: Path
    dataset: str
    archive: str
    sha256: str
    verified: str | None  # "md5" / "sha256" when checked against a published value, else None
    images: dict[str, int]  # split -> image files
    classes: int
    skipped: bool = False


class _Interrupted(Exception):
    """A transfer that stopped early; the next attempt resumes from the partial file."""

    def __init__(self, reason: str, progressed: bool) -> None:
        super().__init__(reason)
        self.progressed = progressed


def source_for(dataset: str, size: str | int | None = None, url: str | None = None) -> Source:
    """Return the archive of ``dataset`` (``size``: fastai's 160, 320 or full; ``url``: a mirror).

    Raises
    ------
    FedvisionError
        For an unknown dataset or size, a size given for CIFAR-10, or a non-HTTP(S) URL.
    """
    if dataset not in DATASETS:
        raise FedvisionError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if url is not None and urlsplit(url).scheme not in ("http", "https"):
        raise FedvisionError(f"--url must be an http:// or https:// address, got {url!r}")
    if dataset == "cifar10":
        if size is not None:
            raise FedvisionError("--size applies to imagenette and imagewoof only, not cifar10")
        required = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH, CIFAR10_META)
        archive = Path(urlsplit(CIFAR10_URL).path).name
        return Source(dataset, archive, url or CIFAR10_URL, CIFAR10_TOP, "cifar10", required, True)
    size = "160" if size is None else str(size)
    if size not in FASTAI_SIZES:
        raise FedvisionError(f"size must be one of {', '.join(FASTAI_SIZES)}, got {size!r}")
    top = f"{dataset}2" if size == "full" else f"{dataset}2-{size}"
    archive = f"{top}.tgz"
    return Source(dataset, archive, url or FASTAI_BASE_URL + archive, top, top, ("train/", "val/"))


def download_dataset(
    dataset: str,
    out: str | os.PathLike[str],
    *,
    size: str | int | None = None,
    url: str | None = None,
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DownloadResult:
    """Download (or take ``archive``), verify and unpack ``dataset`` into ``out/<folder>``.

    Parameters
    ----------
    dataset
        ``imagenette``, ``imagewoof`` or ``cifar10``.
    out
        Folder that receives ``imagenette2-160/`` (etc.) or ``cifar10/``.
    size
        fastai's image size: ``160`` (default), ``320`` or ``full``; not for CIFAR-10.
    url
        Download from here instead of the official address.
    archive
        An archive already on disk: nothing is downloaded, and the file is never deleted.
    progress
        Progress bars and notes on stderr.

    Returns
    -------
    DownloadResult
        ``skipped`` when the folder was already complete.

    Raises
    ------
    FedvisionError
        Unreachable server (the message names the manual route), HTTP error, checksum mismatch,
        corrupt or truncated archive, or a folder in the way. A failure leaves no partial folder;
        a downloaded archive that fails verification is deleted.
    """
    source = source_for(dataset, size, url)
    out = as_path(out)
    if out.exists() and not out.is_dir():
        raise FedvisionError(f"{out} is a file; --out must be a folder")
    dest = out / source.target
    if (dest / DOWNLOAD_RECORD).is_file():
        return _skip(dest, source, progress)
    if dest.exists():
        raise FedvisionError(
            f"{dest} exists but holds no {DOWNLOAD_RECORD}, so it may be incomplete; move it "
            "away or delete it and run this again (or use it as it is)"
        )

    if source.convert_cifar and CHECKSUMS.get(source.archive) is None:
        # The conversion unpickles: never a file that no published checksum vouches for.
        raise FedvisionError(
            f"{source.archive} has no published checksum to verify, so its pickled batches "
            "are not loaded; add one to fedvision.data.download.CHECKSUMS"
        )
    staged = out / PARTIAL_DIR / source.archive
    if archive is not None:
        path, owned = as_path(archive), False
        if not path.is_file():
            raise FedvisionError(f"--archive {path}: no such file")
    elif staged.is_file():
        # Copied there by the user (the manual route), or left by an interrupted run.
        path, owned = staged, True
    else:
        _fetch(source, staged, progress)
        path, owned = staged, True

    origin = str(path) if archive is not None else source.url
    try:
        digests = _digests(path)
        verified = _check_published(path, source, digests)
        members = _list_members(path, source)
        images, classes = _unpack(path, source, members, out, origin, digests, verified, progress)
    except FedvisionError as exc:
        if not owned:
            raise FedvisionError(f"{exc}; {path} is left as it is") from None
        _remove_staged(path)
        raise FedvisionError(f"{exc}; {path.name} was removed: run this again") from None
    if owned:
        _remove_staged(path)  # the data is in place; the archive would only double the disk use
    write_text_atomic(out / f"{source.archive}.sha256", f"{digests['sha256']}  {source.archive}\n")
    return DownloadResult(
        dest, dataset, source.archive, digests["sha256"], verified, images, classes
    )


def format_download(result: DownloadResult) -> str:
    """Human-readable summary of ``download_dataset``'s result."""
    counts = " / ".join(f"{n} {split}" for split, n in result.images.items())
    if result.skipped:
        return (
            f"{result.root}: already complete ({counts} images, {result.classes} classes, "
            f"from {result.archive}); nothing to do"
        )
    lines = [f"{result.root}: {counts} images in {result.classes} classes from {result.archive}"]
    if result.verified:
        lines.append(
            f"{result.archive}: {result.verified} matches the published checksum; "
            f"sha256 {result.sha256}"
        )
    else:
        lines.append(
            f"{result.archive}: no published checksum, verified as a complete archive only; "
            f"sha256 {result.sha256} (written to {result.root.parent / result.archive}.sha256 "
            "to pin it)"
        )
    return "\n".join(lines)


# --- download -------------------------------------------------------------------------------------


def _manual_route(source: Source, staged: Path) -> str:
    return (
        f"download {source.url} on a machine with internet, copy it to {staged} "
        "(or pass --archive FILE), then run this again"
    )


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


def _fetch(source: Source, staged: Path, progress: bool) -> None:
    """Download ``source.url`` into ``staged`` through ``staged.part``, resuming after breaks."""
    part = staged.with_name(staged.name + ".part")
    stalls = 0
    while True:
        try:
            _fetch_once(source, part, staged, progress)
        except _Interrupted as exc:
            stalls = 0 if exc.progressed else stalls + 1
            if stalls >= _MAX_STALLS:
                have = part.stat().st_size if part.exists() else 0
                raise FedvisionError(
                    f"the download of {source.url} keeps breaking off ({exc}); {have} bytes are "
                    f"kept in {part} and running this again resumes, or "
                    + _manual_route(source, staged)
                ) from None
            if not exc.progressed:
                time.sleep(min(2.0**stalls, 30.0))
            continue
        os.replace(part, staged)
        return


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (start, total); None where absent."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-")[0]
    return (
        int(start) if start.isdigit() else None,
        int(total) if total.isdigit() else None,
    )


def _fetch_once(source: Source, part: Path, staged: Path, progress: bool) -> None:
    """One GET: append to ``part`` (206) or rewrite it (200); raise ``_Interrupted`` if short."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"fedvision/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(source.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            # Nothing left after byte `have`: either the file is complete or the server's copy
            # changed (shorter); in the second case start again.
            if _content_range(exc.headers.get("Content-Range"))[1] == have:
                return
            part.unlink()
            raise _Interrupted("the server's file is shorter than the partial one", True) from None
        raise FedvisionError(
            f"{source.url} answered HTTP {exc.code} {_one_line(exc.reason)}: check --url, or "
            + _manual_route(source, staged)
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        where = urlsplit(source.url).netloc
        reason = _one_line(getattr(exc, "reason", exc))
        kept = f"; {have} bytes are kept in {part} for a resume" if have else ""
        raise FedvisionError(
            f"cannot reach {where} ({reason}){kept}: " + _manual_route(source, staged)
        ) from None

    with response:
        start, total = 0, None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Interrupted("the server resumed at another byte than asked", False)
        else:
            # A 200 is the whole file: a server that ignores Range restarts from zero.
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        part.parent.mkdir(parents=True, exist_ok=True)
        got = 0
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=source.archive,
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Interrupted(_one_line(exc), got > 0) from None
    if total is not None and start + got < total:
        raise _Interrupted(f"connection closed at byte {start + got} of {total}", got > 0)


# --- verification ---------------------------------------------------------------------------------


def _digests(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file in one read."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _check_published(path: Path, source: Source, digests: dict[str, str]) -> str | None:
    """Compare with ``CHECKSUMS``; return the algorithm that matched, None if none is known."""
    known = CHECKSUMS.get(source.archive)
    if known is None:
        return None
    algorithm, expected = known
    if digests[algorithm] != expected.lower():
        raise FedvisionError(
            f"{path.name}: {algorithm} {digests[algorithm]} is not the published {expected}, so "
            "the file is damaged or not the official archive"
        )
    return algorithm


def _member_path(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _list_members(path: Path, source: Source) -> list[str]:
    """Read the whole archive once: every member under ``source.top``, plain files and folders
    only, the required entries present and the gzip CRC intact. Returns the member paths."""
    names: list[str] = []
    files: set[str] = set()
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                for member in tar:
                    name = _member_path(member.name)
                    if name in ("", "."):
                        continue
                    parts = name.split("/")
                    if parts[0] != source.top or ".." in parts or name.startswith("/"):
                        raise FedvisionError(
                            f"{path.name} holds {member.name!r}, outside {source.top}/; refused"
                        )
                    if not (member.isfile() or member.isdir()):
                        raise FedvisionError(
                            f"{path.name} holds {member.name!r}, a link or special file; refused"
                        )
                    names.append(name)
                    if member.isfile():
                        files.add(name)
            # tarfile stops at the end-of-archive blocks; reading on checks the gzip CRC.
            while gz.read(_CHUNK):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise FedvisionError(
            f"{path.name} is not a complete gzip/tar archive ({_one_line(exc)}), so it is "
            "damaged or truncated"
        ) from None
    # Folders count when something is inside them: some tar writers store no folder entries.
    folders = {name[:i] for name in names for i, c in enumerate(name) if c == "/"}
    missing = [
        r
        for r in source.required
        if f"{source.top}/{r.rstrip('/')}" not in (folders if r.endswith("/") else files)
    ]
    if missing:
        raise FedvisionError(
            f"{path.name} is not the {source.dataset} archive: no {source.top}/"
            f"{', '.join(missing)} in it"
        )
    return names


def _remove_staged(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # .partial/, once nothing else is in it


# --- unpacking ------------------------------------------------------------------------------------


def _unpack(
    path: Path,
    source: Source,
    members: list[str],
    out: Path,
    origin: str,
    digests: dict[str, str],
    verified: str | None,
    progress: bool,
) -> tuple[dict[str, int], int]:
    """Extract (and convert) into a temporary folder in ``out``, then rename it into place."""
    if not hasattr(tarfile, "data_filter"):
        raise FedvisionError("safe extraction needs Python 3.11.4 or later (tarfile filters)")
    out.mkdir(parents=True, exist_ok=True)
    # Inside `out`, so that the final rename stays on one file system and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.target}.", suffix=".extract", dir=out))
    try:
        try:
            with (
                tarfile.open(path, "r:gz") as tar,
                tqdm(
                    total=len(members),
                    desc=f"extract {source.archive}",
                    unit="file",
                    disable=not progress,
                    file=sys.stderr,
                ) as bar,
            ):
                tar.extractall(tmp, members=_counted(tar, bar), filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise FedvisionError(
                f"extracting {path.name} into {out} failed ({_one_line(exc)})"
            ) from None
        if source.convert_cifar:
            tree = tmp / source.target
            classes = _convert_cifar(tmp / source.top, tree, progress)
        else:
            tree = tmp / source.top
            classes = sum(1 for p in (tree / "train").iterdir() if p.is_dir())
        images = {split: _count_files(tree / split) for split in ("train", "val")}
        record = {
            "dataset": source.dataset,
            "archive": source.archive,
            "from": origin,
            "md5": digests["md5"],
            "sha256": digests["sha256"],
            "verified": verified,
            "images": images,
            "classes": classes,
            "fedvision": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Written before the rename: a final folder always carries its record.
        write_json_atomic(tree / DOWNLOAD_RECORD, record)
        try:
            tree.rename(out / source.target)
        except OSError as exc:
            raise FedvisionError(
                f"cannot move the unpacked data to {out / source.target} ({_one_line(exc)}); "
                "is another download writing there?"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return images, classes


def _counted(tar: tarfile.TarFile, bar: tqdm) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        yield member
        bar.update(1)


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _skip(dest: Path, source: Source, progress: bool) -> DownloadResult:
    try:
        record = json.loads((dest / DOWNLOAD_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise FedvisionError(
            f"{dest / DOWNLOAD_RECORD} is unreadable ({_one_line(exc)}); delete {dest} and run "
            "this again"
        ) from None
    if progress:
        print(f"{dest} is already complete; skipped", file=sys.stderr)
    return DownloadResult(
        dest,
        source.dataset,
        source.archive,
        record.get("sha256", ""),
        record.get("verified"),
        dict(record.get("images", {})),
        int(record.get("classes", 0)),
        skipped=True,
    )


# --- CIFAR-10 -------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    # pickle can run code; these files come from an archive whose published checksum matched
    # (download_dataset refuses the conversion otherwise), and the pickle is CIFAR's official
    # format, loaded as its authors document (encoding="bytes": the batches are Python 2 pickles).
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    if not isinstance(obj, dict):
        raise FedvisionError(f"{path.name} is not a CIFAR-10 batch (a {type(obj).__name__})")
    return obj


def _batch_arrays(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as [N, 32, 32, 3] uint8 (from channel-major rows) and its labels."""
    batch = _unpickle(path)
    data = np.asarray(batch.get(b"data"))
    labels = np.asarray(batch.get(b"labels"), dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (data.shape[0],)
        or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes)
    ):
        raise FedvisionError(f"{path.name} is not in CIFAR-10's batch format")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _convert_cifar(batches: Path, tree: Path, progress: bool) -> int:
    """Write CIFAR-10's batches as ``tree/{train,val}/<class>/<index>.png``; return the classes."""
    meta = _unpickle(batches / CIFAR10_META)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if not names or any(not n or "/" in n or n.startswith(".") for n in names):
        raise FedvisionError(f"{CIFAR10_META} has no usable label_names ({names[:10]})")
    for split in ("train", "val"):
        for name in names:
            (tree / split / name).mkdir(parents=True, exist_ok=True)
    splits = (("train", CIFAR10_TRAIN_BATCHES), ("val", (CIFAR10_TEST_BATCH,)))
    with tqdm(desc="cifar10 -> png", unit="img", disable=not progress, file=sys.stderr) as bar:
        for split, files in splits:
            index = 0  # numbered through the split in the batches' order
            for file in files:
                images, labels = _batch_arrays(batches / file, len(names))
                for image, label in zip(images, labels, strict=True):
                    # PNG: lossless, so the pixels are exactly CIFAR's.
                    Image.fromarray(image).save(tree / split / names[label] / f"{index:05d}.png")
                    index += 1
                bar.update(len(labels))
                (batches / file).unlink()  # halves the temporary disk use
    return len(names)
