"""`fedvision data check`: counts, modes, sizes and unreadable files of a tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvision.data.check import check_tree, format_report
from fedvision.errors import FedvisionError

WNIDS = ["n01000001", "n01000002", "n01000003", "n01000004"]


def _jpeg(path: Path, seed: int, size: tuple[int, int], mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").convert(mode).save(path, "JPEG", quality=90)
    return path


def _tree(root: Path) -> tuple[Path, dict[str, Path]]:
    """4 classes: train 3 RGB images each (sizes 40x30, 40x30, 50x20), val 1 each (30x30).

    Class 0 of train also holds a greyscale JPEG, a CMYK JPEG, an RGBA PNG named .JPEG, a file of
    random bytes and a truncated JPEG.
    """
    sizes = [(40, 30), (40, 30), (50, 20)]
    for c, wnid in enumerate(WNIDS):
        for i, wh in enumerate(sizes):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 10 * c + i, wh)
        _jpeg(root / "val" / wnid / f"{wnid}_v.JPEG", 99 + c, (30, 30))
    d = root / "train" / WNIDS[0]
    odd = {
        "grey": _jpeg(d / "grey.JPEG", 1, (40, 30), mode="L"),
        "cmyk": _jpeg(d / "cmyk.JPEG", 2, (40, 30), mode="CMYK"),
    }
    Image.new("RGBA", (40, 30), (1, 2, 3, 4)).save(d / "png.JPEG", "PNG")
    odd["png"] = d / "png.JPEG"
    (d / "corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(3000))
    odd["corrupt"] = d / "corrupt.JPEG"
    data = (d / f"{WNIDS[0]}_0.JPEG").read_bytes()
    (d / "trunc.JPEG").write_bytes(data[: len(data) // 2])
    odd["trunc"] = d / "trunc.JPEG"
    return root, odd


def test_check_full_decode(tmp_path: Path) -> None:
    root, odd = _tree(tmp_path / "ds")
    report = check_tree(root, workers=1, progress=False, chunk_size=4)
    d = report.to_dict()
    json.dumps(d)  # the CLI prints it with --json
    assert d["classes"] == 4
    assert d["images"] == 4 * 3 + 5 + 4  # train + odd files + val
    assert d["splits"]["train"]["per_class"] == {WNIDS[0]: 8, WNIDS[1]: 3, WNIDS[2]: 3, WNIDS[3]: 3}
    assert d["splits"]["val"]["images"] == 4
    # The truncated file has a readable RGB header but fails the full decode: not counted.
    assert d["modes"] == {"RGB": 16, "L": 1, "CMYK": 1, "RGBA": 1}
    assert d["unreadable"] == sorted([str(odd["corrupt"]), str(odd["trunc"])])
    # Readable sizes: 40x30 x (8 + grey, cmyk, png = 11), 50x20 x 4, 30x30 x 4 -> 19 images.
    sizes = d["sizes"]
    assert sizes["most_common"][0] == [40, 30, 11]
    assert sizes["width"] == {"min": 30, "median": 40, "max": 50}
    assert sizes["height"] == {"min": 20, "median": 30, "max": 30}


def test_check_header_only_and_text(tmp_path: Path) -> None:
    root, odd = _tree(tmp_path / "ds")
    report = check_tree(root, header_only=True, workers=1, progress=False)
    d = report.to_dict()
    # Without decoding, the truncated file passes (its header is fine); random bytes do not.
    assert d["unreadable"] == [str(odd["corrupt"])]
    assert d["modes"]["RGB"] == 17
    text = format_report(report)
    assert str(odd["corrupt"]) in text
    assert "classes   4" in text and "CMYK 1" in text and "headers only" in text


def test_check_process_pool_matches_inline(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path / "ds")
    inline = check_tree(root, workers=1, progress=False).to_dict()
    pooled = check_tree(root, workers=2, progress=False, chunk_size=3).to_dict()
    assert pooled == inline


def test_check_errors(tmp_path: Path) -> None:
    with pytest.raises(FedvisionError, match="does not exist"):
        check_tree(tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedvisionError, match="neither train/ nor val/"):
        check_tree(tmp_path / "empty", progress=False)
    root, _ = _tree(tmp_path / "ds")
    (root / "train" / "n05555555").mkdir()
    with pytest.raises(FedvisionError, match="n05555555"):
        check_tree(root, workers=1, progress=False)


def test_a_report_does_not_depend_on_the_order_images_were_counted_in() -> None:
    # A process pool returns its chunks in a varying order; Counter.most_common breaks ties by
    # insertion order, so the pooled report once differed from the inline one (a CI failure).
    from collections import Counter

    from fedvision.data.check import CheckReport

    seen = [(50, 20), (30, 30), (50, 20), (30, 30), (40, 30), (40, 30), (40, 30)]
    modes = ["L", "RGB", "CMYK", "RGB", "CMYK", "RGB", "L"]
    reports = [
        CheckReport(
            root=Path("/d"),
            header_only=False,
            classes=["a"],
            per_class={"train": {"a": 7}},
            modes=Counter(m),
            sizes=Counter(s),
        )
        for m, s in ((modes, seen), (modes[::-1], seen[::-1]))
    ]
    a, b = (r.to_dict() for r in reports)
    assert a == b
    assert a["sizes"]["most_common"] == [[40, 30, 3], [30, 30, 2], [50, 20, 2]]
    assert list(a["modes"].items()) == [("RGB", 3), ("CMYK", 2), ("L", 2)]
