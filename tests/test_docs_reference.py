"""The generated reference pages (docs/reference/cli.md, config.md) and their generator."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python scripts/gen_docs_reference.py` and commit the result"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/gen_docs_reference.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "gen_docs_reference", ROOT / "scripts" / "gen_docs_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_committed_reference_pages_are_current(gen: ModuleType) -> None:
    for rel, text in gen.pages().items():
        path = ROOT / rel
        assert path.exists(), f"{rel} is missing: {REGENERATE}"
        assert path.read_text() == text, f"{rel} is stale: {REGENERATE}"


def test_check_mode_reports_a_stale_page(gen: ModuleType, monkeypatch, tmp_path, capsys) -> None:
    for rel, text in gen.pages().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 0
    (tmp_path / gen.CONFIG_PAGE).write_text("old\n")
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert str(gen.CONFIG_PAGE) in err and str(gen.CLI_PAGE) not in err
    assert len(err.strip().splitlines()) == 1


def test_every_config_key_has_a_meaning(gen: ModuleType) -> None:
    assert gen.missing_meanings() == [], "add a YAML comment to each of these keys in conf/"


def test_check_mode_names_a_key_without_a_comment(
    gen: ModuleType, monkeypatch, tmp_path, capsys
) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(gen.CONF_DIR, conf)
    with (conf / "client" / "default.yaml").open("a") as fh:
        fh.write("zz_new_key: 3\n")
    with (conf / "config.yaml").open("a") as fh:
        fh.write("zz_commented: 1  # what it does\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "CONF_DIR", conf)
    for rel, text in gen.pages().items():  # current pages: only the missing comment is wrong
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert "| `client.zz_new_key` | int | `3` | - |" in (tmp_path / gen.CONFIG_PAGE).read_text()
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "conf/client/default.yaml: zz_new_key" in err
    assert "zz_commented" not in err and "stale" not in err
    assert len(err.strip().splitlines()) == 1


def _row(page: str, key: str) -> list[str]:
    """The cells of the table row whose first cell is `key`."""
    rows = [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"expected one row for {key}, found {rows}"
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def test_config_reference_reads_keys_types_defaults_and_comments(gen: ModuleType, tmp_path) -> None:
    conf = tmp_path / "conf"
    (conf / "widget").mkdir(parents=True)
    (conf / "config.yaml").write_text(
        "# The top-level config.\n"
        "defaults:\n"
        "  - widget: small   # the widget to build\n"
        "  - _self_\n"
        "\n"
        "zz_rounds: 7        # how many rounds the test runs\n"
        "zz_rate: 2.5e-3\n"
        "# a comment above the key, on two\n"
        "# lines\n"
        "zz_name: abc\n"
        "zz_flag: false      # an inline comment that\n"
        "                    # goes on under it\n"
        "zz_path: null\n"
    )
    (conf / "widget" / "small.yaml").write_text(
        "# A small widget: the header describes the option, not its first key.\n"
        "size: 3\n"
        "shape:\n"
        "  sides: [1, 2]     # side lengths, a | b\n"
        "  label: ${zz_name} # copied from the top level\n"
    )
    page = gen.config_markdown(conf)
    assert _row(page, "zz_rounds") == ["`zz_rounds`", "int", "`7`", "how many rounds the test runs"]
    assert _row(page, "zz_rate")[1:] == ["float", "`2.5e-3`", "-"]
    assert _row(page, "zz_name")[1:] == ["str", "`abc`", "a comment above the key, on two lines"]
    assert _row(page, "zz_flag")[1:] == [
        "bool",
        "`false`",
        "an inline comment that goes on under it",
    ]
    assert _row(page, "zz_path")[1:3] == ["null", "`null`"]
    # A group's keys sit under the group's name; nested keys are dotted.
    assert _row(page, "widget.size")[1:] == ["int", "`3`", "-"]
    assert _row(page, "widget.shape.sides")[1:] == ["list", "`[1, 2]`", "side lengths, a \\| b"]
    assert _row(page, "widget.shape.label")[1:] == [
        "interpolation",
        "`${zz_name}`",
        "copied from the top level",
    ]
    assert "| `widget: small` | the widget to build |" in page
    assert "A small widget: the header describes the option, not its first key." in page
    assert "### `widget=small`" in page


def test_cli_reference_has_every_subcommand(gen: ModuleType) -> None:
    page = (ROOT / gen.CLI_PAGE).read_text()
    paths = gen.command_paths()
    assert ("data", "download") in paths and ("run",) in paths
    for path in paths:
        command = " ".join(("fedvision", *path))
        assert f"## `{command}`" in page, f"{command} is missing from {gen.CLI_PAGE}"
        assert f"usage: {command} " in page
