"""Golden runs: the round loop's features give the same ``metrics.jsonl`` as when they were stored.

A refactor of the server or client apps must not change a number. Each case is
``experiment=quick`` with one feature switched on (FedAvg, FedProx, SCAFFOLD, FedNova,
client-level DP, DP-SGD, simulated devices, FedBN, SecAgg+), run in this process against the real
ClientApps on a tiny generated dataset (seconds, no Ray); its records are compared with
``tests/golden/<case>.json``, wall times aside.

Float rounding differs between CPU instruction sets and torch builds, so the comparison is exact
only where the stored environment (torch version, CPU capability) is this one; elsewhere floats
must agree to 1e-4 relative (still far below any real behaviour change, which moves losses in the
second digit). Re-record after an intended change of behaviour, and say why in the commit::

    FEDVISION_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_runs.py
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.fl import secagg_clientapp
from fedvision.fl.server import serve
from fedvision.report.metrics import read_metrics
from fedvision.runner import run_experiment

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("FEDVISION_RECORD_GOLDEN") == "1"

# Keys that measure time or the machine, not what the federation computed.
TIMING = {"round_s", "train_s", "eval_s", "time_s", "wall_s", "elapsed_s", "timestamp", "time"}

# Client-level DP refuses BatchNorm statistics that travel un-noised; DP-SGD needs them frozen.
HEAD = "model.finetune=head"
CASES: dict[str, list[str]] = {
    "fedavg": [],
    "fedprox": ["strategy=fedprox", "strategy.proximal_mu=0.1"],
    "scaffold": ["strategy=scaffold"],
    "fednova": ["strategy=fednova"],
    "dp_server_fixed": ["privacy=server_fixed", "privacy.wrapper.noise_multiplier=0.5", HEAD],
    "dpsgd": ["privacy=dpsgd", HEAD],
    "system_tiers": ["system=tiers", "system.deadline_s=40", "system.dropout=0.2"],
    "fedbn": ["client.local_bn=true", "strategy.fraction_evaluate=1.0"],
    "secaggplus": ["secagg=secaggplus", "model=shufflenet_v2_x0_5"],
}


def _overrides(dataset: Path, case: str) -> list[str]:
    return [
        "experiment=quick",
        f"data.root={dataset}",
        f"data.classes_file={dataset / 'target_classes.txt'}",
        "data.size=16",
        "data.workers=1",
        "model=resnet18",
        "model.weights=none",
        "num_clients=3",
        "num_rounds=2",
        "partition.min_size=3",
        "client.local_steps=2",
        "client.batch_size=4",
        "progress=false",
        "tracking=none",
        "runtime=prepare_only",
        *CASES[case],
    ]


def _run(dataset: Path, run_dir: Path, case: str, grids) -> list[dict[str, Any]]:
    """Prepare the case's run directory and serve it in this process; its metric records."""
    cfg = compose_config(_overrides(dataset, case))
    # Flower's DP wrappers draw their noise from numpy's global generator; fix it per run.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if case == "secaggplus":
        # prepare_only is refused for SecAgg+ runs; prepare with it off, then switch it on.
        plain = cfg.copy()
        plain.secagg = {}
        assert run_experiment(plain, run_dir) == {"prepared": str(run_dir)}
        (run_dir / C.RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        nodes = {100 + p: {C.KEY_PARTITION_ID: p, C.KEY_NUM_PARTITIONS: 3} for p in range(3)}
        grid = grids.loopback(
            dict.fromkeys(nodes, secagg_clientapp.app),
            node_config=nodes,
            run_config={C.RUN_DIR_KEY: str(run_dir)},
        )
        serve(grid, run_dir)
    else:
        assert run_experiment(cfg, run_dir) == {"prepared": str(run_dir)}
        serve(grids.inline(run_dir, 3), run_dir)
    status = json.loads((run_dir / C.RUN_STATUS).read_text())
    assert status["status"] == "finished", status
    return [_untimed(r) for r in read_metrics(run_dir)]


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING and not k.endswith("_wall_s")}


def _environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _differences(got: Any, want: Any, path: str, exact: bool) -> list[str]:
    """Where ``got`` differs from ``want`` (exactly, or floats to 1e-4 relative)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: not in the golden run" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += _differences(got[k], want[k], f"{path}.{k}", exact)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(got)} items, golden {len(want)}"]
        pairs = enumerate(zip(got, want, strict=True))
        return [d for i, (g, w) in pairs for d in _differences(g, w, f"{path}[{i}]", exact)]
    close = isinstance(want, float) and isinstance(got, float) and not exact
    if close and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7):
        return []
    if got == want or (isinstance(want, float) and math.isnan(want) and math.isnan(got)):
        return []
    return [f"{path}: {got!r}, golden {want!r}"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_golden_run_gives_the_stored_metrics(case, generated_dataset, grids, tmp_path):
    records = _run(generated_dataset, tmp_path / "run", case, grids)
    assert len(records) == 3 and [r["round"] for r in records] == [0, 1, 2]
    path = GOLDEN / f"{case}.json"
    if RECORD:
        # A stored run must be reproducible in the first place: run it twice.
        again = _run(generated_dataset, tmp_path / "again", case, grids)
        assert _differences(again, records, case, exact=True) == []
        GOLDEN.mkdir(exist_ok=True)
        doc = {"environment": _environment(), "overrides": CASES[case], "records": records}
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    stored = json.loads(path.read_text())
    exact = stored["environment"] == _environment()
    diffs = _differences(records, stored["records"], case, exact)
    assert not diffs, (
        f"{len(diffs)} differences from {path.name} "
        f"({'exact' if exact else 'to 1e-4'}; stored on {stored['environment']}):\n"
        + "\n".join(diffs[:20])
    )
