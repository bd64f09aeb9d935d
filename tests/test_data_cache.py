"""`fedvision data prepare`: the decoded cache, its resumption, reuse, refusal and torch Dataset."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedvision.constants import CACHE_IMAGES, CACHE_META, CACHE_PROGRESS
from fedvision.data import images as images_mod
from fedvision.data.cache import (
    CachedImageDataset,
    DecodedCache,
    PreparedDataset,
    batch_collate,
    default_cache_dir,
    format_prepare,
    prepare_dataset,
)
from fedvision.data.folder import ClassSelection, scan_split
from fedvision.data.images import decode_resized, load_rgb, resize_center_crop
from fedvision.errors import FedvisionError
from fedvision.paths import cache_root

WNIDS = ["n01000001", "n01000002", "n01000003", "n01000004"]
PER_CLASS = 6
SIZE = 16


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    # Smooth content, so that the resize is not dominated by JPEG noise.
    low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize(size, Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """4 classes x 6 train images (class 1 includes grey, CMYK, PNG-as-JPEG, corrupt, truncated)."""
    root = tmp_path / "ds"
    for c, wnid in enumerate(WNIDS):
        for i in range(PER_CLASS):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 10 * c + i, (40 + i, 30))
        for i in range(2):
            _jpeg(root / "val" / wnid / f"{wnid}_v{i}.JPEG", 500 + 10 * c + i)
    d = root / "train" / WNIDS[1]
    _jpeg(d / "a_grey.JPEG", 1, mode="L")
    _jpeg(d / "b_cmyk.JPEG", 2, mode="CMYK")
    Image.new("RGBA", (30, 20), (9, 90, 200, 255)).save(d / "c_png.JPEG", "PNG")
    (d / "d_corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(1500))
    data = (d / f"{WNIDS[1]}_0.JPEG").read_bytes()
    (d / "e_trunc.JPEG").write_bytes(data[: len(data) // 2])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {w[-1]}\n" for w in WNIDS))
    return root


def _bad(root: Path) -> set[str]:
    return {str(root / "train" / WNIDS[1] / n) for n in ("d_corrupt.JPEG", "e_trunc.JPEG")}


def test_round_trip_skips_bad_files(tree: Path, tmp_path: Path) -> None:
    prep = prepare_dataset(tree, tmp_path / "c", size=SIZE, workers=1, progress=False)
    assert isinstance(prep, PreparedDataset) and prep.classes == WNIDS
    assert {s.path for s in prep.skipped} == _bad(tree)
    assert all(s.split == "train" and s.reason for s in prep.skipped)
    scanned = scan_split(tree, "train")
    kept = [(f, y) for f, y in zip(scanned.files, scanned.labels, strict=True)]
    kept = [(f, y) for f, y in kept if str(f) not in _bad(tree)]
    train = prep.train
    assert train is not None and len(train) == 4 * PER_CLASS + 3
    assert train.images.shape == (27, 3, SIZE, SIZE) and train.images.dtype == np.uint8
    assert not train.images.flags.writeable
    # Labels of the kept images stay right after the corrupt rows are compacted away.
    assert train.labels.tolist() == [int(y) for _, y in kept]
    for row in (0, 6, 7, 8, 9, 26):
        path = kept[row][0]
        assert np.array_equal(train.images[row], decode_resized(path, SIZE))
    # The draft decode is a no-op for these small files: same as a plain full decode.
    assert np.array_equal(train.images[0], resize_center_crop(load_rgb(kept[0][0]), SIZE))
    assert train.class_names == [f"thing {w[-1]}" for w in WNIDS]
    meta = json.loads((prep.path / "train" / CACHE_META).read_text())
    assert {d["path"] for d in meta["skipped"]} == _bad(tree)
    assert meta["counts_per_class"][WNIDS[1]] == PER_CLASS + 3
    assert prep.val is not None and len(prep.val) == 8 and prep.val.meta["skipped"] == []
    text = format_prepare(prep)
    assert str(prep.path) in text and "skipped   2" in text and "d_corrupt.JPEG" in text


def test_default_dir_and_reuse(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prep = prepare_dataset(tree, size=SIZE, workers=1, progress=False)
    fp = prep.train.meta["dataset_fingerprint"]
    assert prep.path == default_cache_dir(tree, fp, SIZE)
    assert prep.path.parent == cache_root() and prep.path.name.endswith(f"-{SIZE}px")

    def no_decoding(*args, **kwargs):
        raise AssertionError("a complete cache must be reused without decoding")

    monkeypatch.setattr(images_mod, "decode_resized", no_decoding)
    again = prepare_dataset(tree, size=SIZE, workers=1, progress=False)
    assert again.reused and again.decoded == 0 and again.path == prep.path
    assert np.array_equal(again.train.images, prep.train.images)
    assert len(again.skipped) == 2
    reopened = PreparedDataset.open(prep.path)
    assert np.array_equal(reopened.val.labels, prep.val.labels)


def test_resume_after_interruption(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clean = prepare_dataset(tree, tmp_path / "clean", size=SIZE, workers=1, progress=False)
    real = images_mod.decode_resized
    calls: list[str] = []

    def failing(path, size):
        calls.append(str(path))
        if len(calls) == 7:  # first image of chunk 3 (chunks of 2) of train
            raise RuntimeError("simulated crash")
        return real(path, size)

    monkeypatch.setattr(images_mod, "decode_resized", failing)
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(tree, out, size=SIZE, workers=1, progress=False, chunk_size=2)
    assert not (out / "train" / CACHE_META).exists()
    with pytest.raises(FedvisionError, match="fedvision data prepare"):
        DecodedCache.open(out / "train")
    lines = (out / CACHE_PROGRESS).read_text().splitlines()
    assert len(lines) == 1 + 3  # header + chunks 0, 1, 2

    calls.clear()
    monkeypatch.setattr(
        images_mod, "decode_resized", lambda p, s: calls.append(str(p)) or real(p, s)
    )
    # A different chunk_size argument does not matter: the run keeps the one it started with.
    prep = prepare_dataset(tree, out, size=SIZE, workers=1, progress=False, chunk_size=5)
    train_files = scan_split(tree, "train").files
    assert calls[: len(train_files) - 6] == [str(p) for p in train_files[6:]]
    assert len(calls) == len(train_files) - 6 + 8  # the rest of train, then all of val
    for split in ("train", "val"):
        a, b = getattr(prep, split), getattr(clean, split)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert {s.path for s in prep.skipped} == _bad(tree)
    assert not list(out.glob("*/images.partial.u8"))


def test_stale_cache_is_refused_unless_overwrite(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    first = prepare_dataset(tree, out, size=SIZE, workers=1, progress=False)
    victim = tree / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    _jpeg(victim, 777, (60, 60))
    os.utime(victim, ns=(1, 1))
    with pytest.raises(FedvisionError, match="overwrite") as info:
        prepare_dataset(tree, out, size=SIZE, workers=1, progress=False)
    assert "\n" not in str(info.value)
    # Other options are another fingerprint too.
    with pytest.raises(FedvisionError, match="fingerprint differs"):
        prepare_dataset(tree, out, size=SIZE, selection=ClassSelection(first_n=2), progress=False)
    again = prepare_dataset(tree, out, size=SIZE, workers=1, progress=False, overwrite=True)
    assert not again.reused
    assert again.train.meta["fingerprint"] != first.train.meta["fingerprint"]
    assert np.array_equal(again.train.images[0], decode_resized(victim, SIZE))
    # The default folder is named after the fingerprint, so it never holds a stale cache.
    assert prepare_dataset(tree, size=SIZE, workers=1, progress=False).path != first.path


def test_refuses_half_written_or_foreign(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    sel = ClassSelection(first_n=2)
    prepare_dataset(tree, out, size=SIZE, selection=sel, workers=1, progress=False)
    (out / "val" / CACHE_IMAGES).write_bytes(b"\0" * 10)
    with pytest.raises(FedvisionError, match="fedvision data prepare"):
        DecodedCache.open(out / "val")
    # prepare notices the damage and rebuilds that split.
    rebuilt = prepare_dataset(tree, out, size=SIZE, selection=sel, workers=1, progress=False)
    assert not rebuilt.reused and rebuilt.decoded == 4 and len(rebuilt.val) == 4
    (out / "train" / CACHE_META).unlink()
    with pytest.raises(FedvisionError, match="not a complete decoded cache"):
        DecodedCache.open(out / "train")
    with pytest.raises(FedvisionError, match="does not exist"):
        DecodedCache.open(tmp_path / "nothing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(FedvisionError, match="not a fedvision cache"):
        prepare_dataset(tree, foreign, size=SIZE, progress=False, overwrite=True)
    assert (foreign / "x").read_text() == "x"


def test_dataset_in_dataloader_workers(tree: Path, tmp_path: Path) -> None:
    # Two decoding processes: the pool path gives the same cache as the in-process one.
    prep = prepare_dataset(tree, tmp_path / "c", size=SIZE, workers=2, progress=False, chunk_size=4)
    assert {s.path for s in prep.skipped} == _bad(tree)
    cache = prep.train
    idx = np.arange(1, len(cache), 2)
    ds = CachedImageDataset(cache, indices=idx)
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (3, SIZE, SIZE) and isinstance(y, int)
    assert torch.equal(x, torch.from_numpy(np.array(cache.images[idx[3]])))
    # Pickling carries the path and indices, not the pixels.
    assert len(pickle.dumps(ds)) < 2000 < cache.images.nbytes
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=5,
        num_workers=2,
        collate_fn=batch_collate,
        multiprocessing_context="spawn",
    )
    xs, ys = zip(*loader, strict=True)
    assert torch.equal(torch.cat(xs), torch.from_numpy(cache.images[idx]))
    assert torch.cat(ys).tolist() == cache.labels[idx].tolist()
    assert torch.cat(ys).dtype == torch.int64
    flipped = CachedImageDataset(cache, transform=lambda t: t.flip(-1))
    bx, _ = flipped.__getitems__([0, 2])
    assert torch.equal(bx[1], torch.from_numpy(np.array(cache.images[2])).flip(-1))
    with pytest.raises(FedvisionError):
        CachedImageDataset(cache, indices=np.array([len(cache)]))
