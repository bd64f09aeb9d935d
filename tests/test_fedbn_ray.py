"""FedBN in Flower's Ray simulation: a node's Context.state (its own BatchNorm) outlives a round."""

from __future__ import annotations

import subprocess
import time

import torch

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.generate import generate_dataset
from fedvision.models import batchnorm_keys, build_model
from fedvision.report.metrics import read_metrics
from fedvision.runner import run_experiment

RAY = "raylet|gcs_server"


def _no_ray_left() -> bool:
    for _ in range(50):  # Ray's processes take a moment to exit after shutdown
        if not subprocess.run(["pgrep", "-f", RAY], capture_output=True, text=True).stdout.strip():
            return True
        time.sleep(0.2)
    return False


def test_each_simulated_client_keeps_its_batchnorm_across_rounds(tmp_path):
    data = generate_dataset(
        tmp_path / "gen", num_classes=3, num_source=1, train_per_class=12, val_per_class=4,
        size=16, workers=1, progress=False,
    )  # fmt: skip
    cfg = compose_config(
        [
            f"data.root={data}",
            f"data.classes_file={data / 'target_classes.txt'}",
            "data.size=16",
            "data.workers=1",
            "model=resnet18",
            "num_clients=2",
            "num_rounds=2",
            "partition=iid",
            "partition.val_fraction=0.3",
            "client.local_bn=true",
            "client.local_steps=1",
            "client.batch_size=4",
            "strategy.fraction_evaluate=1.0",
            "strategy.min_evaluate_nodes=1",
            "progress=false",
        ]
    )
    run_dir = tmp_path / "run"
    summary = run_experiment(cfg, run_dir)
    records = read_metrics(run_dir)
    # Each client's BatchNorm starts from the initial weights once, in round 1; in round 2
    # both clients find their own in their Context (Flower's simulation keeps it per node, in
    # the driver process, and hands it to whichever Ray worker runs the node's next message).
    assert [r["clients_new_bn"] for r in records[1:]] == [2, 0]
    assert summary["selection"] == "client_val_accuracy" and summary["local_bn"] is True
    assert all(r["client_val_accuracy"] is not None for r in records[1:])
    # Nothing of BatchNorm travels: each direction carries the full model minus its BN entries.
    state = build_model("resnet18", 2).state_dict()
    bn = set(batchnorm_keys(build_model("resnet18", 2)))
    # One packed float32 array per message (fedvision/fl/arrays.py): a 128-byte .npy header,
    # the floats, and its key.
    shared = 128 + 4 * sum(t.numel() for k, t in state.items() if k not in bn) + len(C.KEY_FLAT)
    assert all(r["bytes_down"] == r["bytes_up"] == 2 * shared for r in records[1:])
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    initial = torch.load(run_dir / C.RUN_INITIAL, weights_only=True)
    assert all(torch.equal(latest[k].to(initial[k].dtype), initial[k]) for k in bn)
    assert _no_ray_left()
