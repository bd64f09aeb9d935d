"""The built-in generated dataset: layout, determinism, reuse, refusal, interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvision.data import generate as gen
from fedvision.data.folder import read_class_names, scan_dataset
from fedvision.data.generate import class_specs, generate_dataset, read_source_target
from fedvision.data.images import load_rgb
from fedvision.errors import FedvisionError
from fedvision.paths import builtin_dataset_dir

SMALL = {
    "num_classes": 5,
    "num_source": 3,
    "train_per_class": 4,
    "val_per_class": 2,
    "size": 32,
    "workers": 1,
    "progress": False,
}


def test_layout_and_class_files(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "ds", **SMALL)
    specs = class_specs(5, 3)
    wnids = [s.wnid for s in specs]
    assert wnids == [f"n9000000{k}" for k in range(5)]
    scanned = scan_dataset(out)
    assert scanned["train"].classes == wnids and scanned["val"].classes == wnids
    assert scanned["train"].counts() == dict.fromkeys(wnids, 4)
    assert scanned["val"].counts() == dict.fromkeys(wnids, 2)
    assert (out / "train" / wnids[2] / f"{wnids[2]}_3.JPEG").is_file()
    img = load_rgb(out / "val" / wnids[0] / f"{wnids[0]}_1.JPEG")
    assert img.size == (32, 32) and img.mode == "RGB"
    # ImageNet's LOC_synset_mapping.txt format: "<wnid> <name>".
    names = read_class_names(out)
    assert names == {s.wnid: s.name for s in specs}
    assert len(names[wnids[0]].split()) == 3  # "<texture> <colour> <shape>"
    source, target = read_source_target(out)
    assert source == wnids[:3] and target == wnids[3:]
    assert not set(source) & set(target)
    info = json.loads((out / gen.DATASET_JSON).read_text())
    assert info["params"]["seed"] == 0 and len(info["fingerprint"]) == 64
    assert [c["role"] for c in info["classes"]] == ["source"] * 3 + ["target"] * 2
    assert not list(tmp_path.glob(".*partial"))


def test_class_specs_are_distinct_combinations() -> None:
    specs = class_specs(30, 20)
    combos = {(s.shape, s.texture, s.colour) for s in specs}
    assert len(combos) == 30
    # Source and target share attribute families (transfer) but not combinations.
    src, tgt = specs[:20], specs[20:]
    assert {s.shape for s in tgt} <= {s.shape for s in src}
    assert {s.texture for s in tgt} <= {s.texture for s in src}
    assert {s.colour for s in tgt} <= {s.colour for s in src}
    assert class_specs(30, 20)[:20] == class_specs(20, 20)


def test_deterministic_bytes_and_fingerprint(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", **SMALL)
    b = generate_dataset(tmp_path / "b", **{**SMALL, "workers": 2})
    c = generate_dataset(tmp_path / "c", **SMALL, seed=1)
    rel = ["train/n90000000/n90000000_0.JPEG", "val/n90000004/n90000004_1.JPEG"]
    for r in rel:
        assert (a / r).read_bytes() == (b / r).read_bytes()
        assert (a / r).read_bytes() != (c / r).read_bytes()

    def fp(p: Path) -> str:
        return json.loads((p / gen.DATASET_JSON).read_text())["fingerprint"]

    assert fp(a) == fp(b) != fp(c)


def test_reuse_refuse_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = generate_dataset(tmp_path / "ds", **SMALL)
    probe_file = out / "train" / "n90000000" / "n90000000_0.JPEG"
    stamp = probe_file.stat().st_mtime_ns
    again = generate_dataset(tmp_path / "ds", **{**SMALL, "progress": True})
    assert again == out and probe_file.stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().err
    with pytest.raises(FedvisionError, match="other parameters"):
        generate_dataset(tmp_path / "ds", **{**SMALL, "train_per_class": 3})
    generate_dataset(tmp_path / "ds", **{**SMALL, "train_per_class": 3}, overwrite=True)
    assert not (out / "train" / "n90000000" / "n90000000_3.JPEG").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(FedvisionError, match="not empty"):
        generate_dataset(foreign, **SMALL, overwrite=True)
    assert (foreign / "x.txt").read_text() == "mine"


def test_interrupted_run_is_not_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = gen._render_task

    def flaky(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gen, "_render_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "ds", **SMALL)
    assert not (tmp_path / "ds" / gen.DATASET_JSON).exists()
    monkeypatch.setattr(gen, "_render_task", real)
    out = generate_dataset(tmp_path / "ds", **SMALL)
    assert (out / gen.DATASET_JSON).is_file()
    assert sum(1 for _ in out.glob("train/*/*.JPEG")) == 20
    assert not (tmp_path / ".ds.partial").exists()


def test_default_location_and_bad_values(tmp_path: Path) -> None:
    out = generate_dataset(**{**SMALL, "num_classes": 2, "num_source": 1})
    assert out == builtin_dataset_dir() and (out / gen.DATASET_JSON).is_file()
    for bad in ({"num_source": 5}, {"num_classes": 1, "num_source": 0}, {"size": 4}):
        with pytest.raises(FedvisionError):
            generate_dataset(tmp_path / "bad", **{**SMALL, **bad})


@pytest.mark.slow
def test_central_baseline_learns_above_chance(tmp_path: Path) -> None:
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "central_baseline.py"
    main = runpy.run_path(str(script))["main"]
    root = generate_dataset(
        tmp_path / "ds",
        num_classes=6,
        num_source=2,
        train_per_class=60,
        val_per_class=20,
        size=32,
        progress=False,
    )
    # An epoch cap (not the clock) ends training, so the result does not depend on machine load.
    args = ["--root", str(root), "--size", "32", "--max-epochs", "6", "--budget-s", "300"]
    result = main([*args, "--no-progress"])
    assert result["num_classes"] == 4 and result["val_images"] == 80 and result["epochs"] == 6
    assert result["best_val_acc"] > result["chance"] + 0.1
