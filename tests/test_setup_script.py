"""The setup script's check for a cached environment whose scripts name a gone interpreter."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "venv_is_stale.sh"


def _venv(root: Path, shebang: str) -> Path:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "flwr").write_text(f"#!{shebang}\nimport sys\n")
    (bin_dir / "activate").write_text("# sourced, no #! line\n")
    return root


def _stale(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), str(venv)], capture_output=True, text=True)


def test_a_script_naming_a_gone_clone_marks_the_environment_stale(tmp_path):
    """The CI failure: `flwr` began `#!/work/ciclone/.venv/bin/python`, a clone since deleted."""
    venv = _venv(tmp_path / "venv", str(tmp_path / "gone-clone" / ".venv" / "bin" / "python"))
    done = _stale(venv)
    assert done.returncode == 0
    assert "gone-clone" in done.stderr and "flwr" in done.stderr


def test_scripts_naming_an_interpreter_that_exists_keep_the_environment(tmp_path):
    venv = _venv(tmp_path / "venv", f"{tmp_path / 'venv' / 'bin' / 'python'} -E")
    assert _stale(venv).returncode == 1


def test_this_environments_console_scripts_name_an_interpreter_that_exists():
    """What `flwr run` and the deployment tests execute: `.venv/bin/flwr` and its siblings."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flwr").exists():
        pytest.skip(f"no flwr console script beside {sys.executable}")
    done = _stale(bin_dir.parent)
    assert done.returncode == 1, done.stderr
