"""The engine side of privacy never loads Flower (ARCHITECTURE.md: the engine never imports flwr).

Local training, DP-SGD and the RDP accountant run in one process without a Flower message; the
check imports them in a fresh interpreter, since this one has loaded flwr for other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLWR_FREE = (
    "fedvision.engine",
    "fedvision.engine.train",
    "fedvision.privacy",
    "fedvision.privacy.accounting",
    "fedvision.privacy.dpsgd",
)


def test_the_engine_and_dpsgd_import_no_flower():
    code = (
        "import importlib, json, sys\n"
        f"for name in {FLWR_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
