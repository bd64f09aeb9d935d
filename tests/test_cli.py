"""The ``fedvision data ...`` commands, run in-process as a user would type them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedvision import constants as C
from fedvision.cli import build_parser, main


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "ds"
    args = "--classes 4 --source-classes 1 --train-per-class 12 --val-per-class 4 --size 32"
    assert main(["data", "generate", "--out", str(root), *args.split(), "--workers", "1"]) == 0
    return root


def test_generate_writes_an_imagenet_style_tree(tree):
    assert {"train", "val", "LOC_synset_mapping.txt"} <= {p.name for p in tree.iterdir()}
    assert len(list((tree / "train").iterdir())) == 4
    assert len((tree / "target_classes.txt").read_text().split()) == 3


def test_check_json_counts_classes_images_and_modes(tree, capsys):
    assert main(["data", "check", str(tree), "--json", "--workers", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == 4
    assert report["images"] == 4 * (12 + 4)
    assert report["modes"] == {"RGB": 64}
    assert report["unreadable"] == []


def test_check_reports_a_corrupt_file_and_exits_1(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split / "n1").mkdir(parents=True)
    from PIL import Image

    Image.new("L", (20, 30)).save(tmp_path / "train" / "n1" / "gray.JPEG", "JPEG")
    Image.new("RGB", (20, 30)).save(tmp_path / "val" / "n1" / "ok.JPEG", "JPEG")
    (tmp_path / "train" / "n1" / "bad.JPEG").write_bytes(b"not a jpeg at all")
    assert main(["data", "check", str(tmp_path), "--json", "--workers", "1", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["modes"] == {"L": 1, "RGB": 1}
    assert [p.endswith("bad.JPEG") for p in report["unreadable"]] == [True]


def test_missing_root_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedvision: error:")


def test_prepare_then_partition_with_run_overrides(tree, tmp_path, capsys):
    assert main(["data", "prepare", str(tree), "--size", "32", "--workers", "1", "--quiet"]) == 0
    assert "decoded 64 images" in capsys.readouterr().out
    out = tmp_path / "parts"
    args = [
        "data",
        "partition",
        f"data.root={tree}",
        "data.size=32",
        "data.workers=1",
        "num_clients=3",
        "partition.alpha=0.3",
        "partition.min_size=2",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| client" in text and "partition fingerprint" in text
    for name in (C.PARTITION_FILE, C.PARTITION_STATS, C.PARTITION_HEATMAP):
        assert (out / name).is_file()
    from fedvision.data.partition import load_partition

    part = load_partition(out / C.PARTITION_FILE)
    assert part.spec.alpha == 0.3 and part.num_clients == 3
    # What `fedvision report` reads: the full fingerprint and how far from IID the split is.
    summary = json.loads((out / C.PARTITION_SUMMARY).read_text())
    assert summary["fingerprint"] == part.fingerprint and summary["clients"] == 3
    assert 0.0 < summary["mean_tv"] <= summary["max_tv"] <= 1.0
    # One image per class (10 % of 12, rounded) is the server's validation part; the clients
    # share the rest, and together they hold every training image exactly once.
    held = np.load(out / C.SERVER_VAL)
    assert len(held) == 4
    clients = np.concatenate([*part.train, *part.val])
    assert sorted(np.concatenate([held, clients]).tolist()) == list(range(4 * 12))
    assert "server validation part: 4 images" in text


@pytest.mark.parametrize("cmd", [["data", "generate"], ["data", "check"], ["data", "prepare"]])
def test_every_command_has_help_that_says_what_it_does(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*cmd, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out.split()) > 20


@pytest.mark.parametrize(
    ("argv", "database"),
    [
        ([], "superlink.db"),
        (["--database", "/tmp/s.db"], "/tmp/s.db"),
        (["--database", "memory"], None),
    ],
)
def test_fedvision_server_keeps_its_state_in_a_file_unless_told_memory(argv, database):
    from fedvision.commands.deploy import server_options

    ns = build_parser().parse_args(["server", "--insecure", *argv])
    opts = server_options(ns)
    assert (None if opts.database is None else str(opts.database)) == database
    cmd = opts.command()
    if database is None:  # Flower's in-memory state: no --database at all
        assert "--database" not in cmd
    else:
        assert cmd[cmd.index("--database") + 1] == database
