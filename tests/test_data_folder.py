"""Image loading (fedvision.data.images) and folder scanning (fedvision.data.folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvision.data.folder import (
    ClassSelection,
    read_class_names,
    scan_dataset,
    scan_split,
)
from fedvision.data.images import (
    UnreadableImageError,
    load_rgb,
    probe,
    resize_center_crop,
)
from fedvision.errors import FedvisionError

WNIDS = ["n01000001", "n01000002", "n01000003", "n01000004"]


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path, "JPEG", quality=90)
    return path


def _tree(root: Path, per_class: int = 3) -> Path:
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", seed=100 * c + i)
    return root


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    """The awkward files ImageNet really contains, plus two broken ones."""
    d = tmp_path / "odd"
    good = _jpeg(d / "good.JPEG", 1)
    files = {
        "good": good,
        "grey": _jpeg(d / "grey.JPEG", 2, mode="L"),
        "cmyk": _jpeg(d / "cmyk.JPEG", 3, mode="CMYK"),
    }
    Image.new("RGBA", (20, 10), (10, 200, 30, 128)).save(d / "png.JPEG", "PNG")
    files["png"] = d / "png.JPEG"
    Image.new("P", (12, 12), 5).save(d / "pal.png")
    files["pal"] = d / "pal.png"
    (d / "corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(2000))
    files["corrupt"] = d / "corrupt.JPEG"
    data = good.read_bytes()
    (d / "trunc.JPEG").write_bytes(data[: len(data) // 2])
    files["trunc"] = d / "trunc.JPEG"
    return files


def test_load_rgb_handles_every_mode(odd_files: dict[str, Path]) -> None:
    for key in ("good", "grey", "cmyk", "png", "pal"):
        img = load_rgb(odd_files[key])
        assert img.mode == "RGB", key
    assert load_rgb(odd_files["png"]).size == (20, 10)
    grey = np.asarray(load_rgb(odd_files["grey"]))
    # A greyscale image becomes three equal channels.
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    # Pillow's PNG plugin ignores the misleading extension: the pixels are the PNG's.
    assert tuple(np.asarray(load_rgb(odd_files["png"]))[0, 0]) == (10, 200, 30)


@pytest.mark.parametrize("key", ["corrupt", "trunc"])
def test_load_rgb_rejects_broken_files(odd_files: dict[str, Path], key: str) -> None:
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(odd_files[key])
    assert isinstance(info.value, FedvisionError)
    assert str(odd_files[key]) in str(info.value)
    assert info.value.path == str(odd_files[key])


def test_load_rgb_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError):
        load_rgb(tmp_path / "nope.JPEG")


def test_probe_reads_header_only(odd_files: dict[str, Path]) -> None:
    assert probe(odd_files["grey"]) == ("L", (40, 32))
    assert probe(odd_files["cmyk"]) == ("CMYK", (40, 32))
    assert probe(odd_files["png"]) == ("RGBA", (20, 10))
    # The header of a truncated file is intact: only a full decode finds the damage.
    assert probe(odd_files["trunc"]) == ("RGB", (40, 32))
    with pytest.raises(UnreadableImageError):
        probe(odd_files["corrupt"])


def test_resize_center_crop_crops_the_centre() -> None:
    # 8 wide x 4 high, column j has value 10*j: shorter side is already 4, so no resize;
    # the crop keeps columns round((8-4)/2)=2 .. 5.
    arr = np.repeat((np.arange(8, dtype=np.uint8) * 10)[None, :, None], 4, axis=0)
    arr = np.repeat(arr, 3, axis=2)
    out = resize_center_crop(Image.fromarray(arr, "RGB"), 4)
    assert out.shape == (3, 4, 4) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [20, 30, 40, 50]


def test_resize_center_crop_resizes_shorter_side() -> None:
    # 60x30 constant image -> shorter side 10 -> 20x10 -> centre 10x10; constant stays constant.
    img = Image.new("RGB", (60, 30), (7, 100, 250))
    out = resize_center_crop(img, 10)
    assert out.shape == (3, 10, 10)
    assert out[:, 5, 5].tolist() == [7, 100, 250]
    # Left half black, right half white, 40x20 -> 20x10 -> crop columns 5..14: the edge is at 5.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    out = resize_center_crop(Image.fromarray(arr), 10)
    assert out[0, 5, 0] == 0 and out[0, 5, 9] == 255


def test_scan_split_labels_and_extensions(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    # Other accepted extensions, any case; other files are ignored.
    _jpeg(root / "train" / WNIDS[1] / "extra.jpg", 7)
    Image.new("RGB", (8, 8)).save(root / "train" / WNIDS[1] / "extra2.PNG")
    (root / "train" / WNIDS[1] / "notes.txt").write_text("x")
    sp = scan_split(root, "train")
    assert sp.classes == WNIDS
    assert len(sp.files) == len(sp.labels) == 14
    for f, label in zip(sp.files, sp.labels, strict=True):
        assert f.parent.name == WNIDS[label]
    assert sp.counts() == {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 3, WNIDS[3]: 3}
    assert sp.labels.dtype == np.int64


def test_scan_split_max_per_class(tmp_path: Path) -> None:
    sp = scan_split(_tree(tmp_path / "ds"), "train", max_per_class=2)
    assert sp.counts() == {w: 2 for w in WNIDS}
    assert [f.name for f in sp.files[:2]] == [f"{WNIDS[0]}_0.JPEG", f"{WNIDS[0]}_1.JPEG"]


def test_scan_split_errors(tmp_path: Path) -> None:
    with pytest.raises(FedvisionError, match="does not exist"):
        scan_split(tmp_path / "missing", "train")
    root = _tree(tmp_path / "ds")
    with pytest.raises(FedvisionError, match="no 'val' folder"):
        scan_split(root, "val")
    (root / "val").mkdir()
    with pytest.raises(FedvisionError, match="is empty"):
        scan_split(root, "val")
    empty = root / "train" / "n09999999"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FedvisionError, match="n09999999") as info:
        scan_split(root, "train")
    assert "\n" not in str(info.value)


def test_class_selection(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    sp = scan_split(root, "train", ClassSelection.from_config(first_n=2))
    assert sp.classes == WNIDS[:2]
    sp = scan_split(root, "train", ClassSelection.from_config(wnids=[WNIDS[3], WNIDS[1]]))
    assert sp.classes == [WNIDS[1], WNIDS[3]]
    # Labels are indices into the selected classes, not into all classes.
    assert sorted(set(sp.labels.tolist())) == [0, 1]
    assert all(f.parent.name == sp.classes[y] for f, y in zip(sp.files, sp.labels, strict=True))
    listing = tmp_path / "classes.txt"
    listing.write_text(f"# target classes\n{WNIDS[2]}\n\n{WNIDS[0]}  # first\n")
    sel = ClassSelection.from_config(file=listing)
    assert sel.wnids == (WNIDS[2], WNIDS[0])
    assert scan_split(root, "train", sel).classes == [WNIDS[0], WNIDS[2]]


def test_class_selection_errors(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    with pytest.raises(FedvisionError, match="n07777777"):
        scan_split(root, "train", ClassSelection.from_config(wnids=[WNIDS[0], "n07777777"]))
    with pytest.raises(FedvisionError, match="only 4 classes"):
        scan_split(root, "train", ClassSelection(first_n=5))
    with pytest.raises(FedvisionError):
        ClassSelection(first_n=0)
    with pytest.raises(FedvisionError):
        ClassSelection.from_config(first_n=2, wnids=[WNIDS[0]])
    with pytest.raises(FedvisionError, match="cannot read"):
        ClassSelection.from_config(file=tmp_path / "missing.txt")


def _flat_val(root: Path) -> dict[str, str]:
    truth = {}
    for i in range(8):
        wnid = WNIDS[i % 4]
        name = f"ILSVRC2012_val_{i + 1:08d}"
        _jpeg(root / "val" / f"{name}.JPEG", 1000 + i)
        truth[name] = wnid
    return truth


def test_flat_val_with_kaggle_csv(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    truth = _flat_val(root)
    rows = [f"{k},{w} 1 2 30 40 {w} 5 6 7 8" for k, w in truth.items()]
    # Kaggle layout: the CSV sits three levels above the image root ILSVRC/Data/CLS-LOC.
    kaggle = tmp_path / "kaggle"
    (kaggle / "ILSVRC" / "Data").mkdir(parents=True)
    root = root.rename(kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    (kaggle / "LOC_synset_mapping.txt").write_text(f"{WNIDS[0]} tench, Tinca tinca\n")
    assert read_class_names(root) == {WNIDS[0]: "tench, Tinca tinca"}
    sp = scan_split(root, "val")
    assert sp.classes == WNIDS
    assert {f.stem: sp.classes[y] for f, y in zip(sp.files, sp.labels, strict=True)} == truth
    assert set(scan_dataset(root)) == {"train", "val"}


def test_flat_val_with_labels_txt(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    truth = _flat_val(root)
    (root / "val_labels.txt").write_text("".join(f"{k}.JPEG {w}\n" for k, w in truth.items()))
    sp = scan_split(root, "val", ClassSelection(first_n=2))
    assert sp.classes == WNIDS[:2]
    assert len(sp.files) == 4
    assert {f.stem: sp.classes[y] for f, y in zip(sp.files, sp.labels, strict=True)} == {
        k: w for k, w in truth.items() if w in WNIDS[:2]
    }


def test_flat_val_errors(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    truth = _flat_val(root)
    with pytest.raises(FedvisionError, match="no ground truth"):
        scan_split(root, "val")
    # The devkit form needs scipy (not a project dependency): the message says what to do.
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n" * 8)
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(FedvisionError, match="scipy"):
            scan_split(root, "val")
    lines = [f"{k}.JPEG {w}\n" for k, w in truth.items()][:-1]
    (root / "val_labels.txt").write_text("".join(lines))
    with pytest.raises(FedvisionError, match="no ground-truth label"):
        scan_split(root, "val")


def test_scan_dataset_requires_same_classes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    for wnid in WNIDS[:3]:
        _jpeg(root / "val" / wnid / "v.JPEG", 5)
    with pytest.raises(FedvisionError, match=WNIDS[3]):
        scan_dataset(root)
    # After selecting the common classes the splits agree.
    out = scan_dataset(root, selection=ClassSelection(first_n=3))
    assert out["val"].classes == out["train"].classes == WNIDS[:3]


def test_read_class_names(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    assert read_class_names(root) == {}
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    assert read_class_names(root) == {
        "n01440764": "tench, Tinca tinca",
        "n01443537": "goldfish, Carassius auratus",
    }
