"""Throughput of the simulated federation against a plain PyTorch loop doing the same work.

(a) ``fedvision run`` machinery: Flower simulation on Ray, N clients, FedAvg, IID partition;
(b) a plain loop in this process: the same model, data, batch size and number of samples.
Both train without augmentation so the work is identical. The federation's images/second is
its steady state (rounds 2 .. R-1: round 1 pays for building models in the workers, round R
for the final evaluation); its one-time start-up (Ray, client discovery, initial evaluation) is
reported on its own. The last line is one JSON object.

    python scripts/bench_sim.py --clients 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.data.partition import load_partition
from fedvision.data.transforms import build_eval_transform
from fedvision.models import build_model
from fedvision.report.metrics import read_metrics
from fedvision.runner import prepare_data, run_experiment


def plain_loop(
    images: np.ndarray,
    labels: np.ndarray,
    model_name: str,
    num_classes: int,
    batch_size: int,
    samples: int,
    lr: float,
) -> float:
    """Train ``samples`` images with a textbook loop; return images per second."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    to_float = build_eval_transform()  # uint8 -> normalised float, as the federation does
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))

    def step(i: int) -> None:
        idx = np.sort(order[(i * batch_size) % len(order) :][:batch_size])
        x = to_float(torch.from_numpy(images[idx]))
        y = torch.from_numpy(labels[idx])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for i in range(3):  # warm-up, as the federation's first round is excluded too
        step(i)
    steps = max(1, samples // batch_size)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (round 1 and the last round are not steady state)")

    overrides = [
        f"num_clients={args.clients}",
        f"num_rounds={args.rounds}",
        "partition=iid",
        f"model.name={args.model}",
        f"client.batch_size={args.batch_size}",
        f"client.local_epochs={args.local_epochs}",
        "client.augment=none",
        "client.lr_schedule=constant",
        f"eval_every={10**6}",
        "strategy.min_train_nodes=1",
        "strategy.min_available_nodes=1",
        "progress=false",
    ]
    cfg = compose_config(overrides)
    prepared = prepare_data(cfg.data, progress=True)
    run_dir = args.out or Path(tempfile.mkdtemp(prefix="fedvision-bench-"))

    t0 = time.perf_counter()
    run_experiment(cfg, run_dir)
    sim_wall = time.perf_counter() - t0
    records = [r for r in read_metrics(run_dir) if r["round"] >= 1]
    train_part = sum(len(p) for p in load_partition(run_dir / C.PARTITION_FILE).train)
    samples_per_round = train_part * args.local_epochs
    steady = records[1:-1]
    sim_img_s = samples_per_round * len(steady) / sum(r["round_s"] for r in steady)
    startup_s = sim_wall - sum(r["round_s"] for r in records)

    plain_img_s = plain_loop(
        prepared.train.images,
        prepared.train.labels,
        args.model,
        len(prepared.classes),
        args.batch_size,
        samples_per_round * len(steady),
        float(cfg.client.lr),
    )
    ratio = sim_img_s / plain_img_s
    print(
        f"model {args.model}, {args.clients} clients, batch {args.batch_size}, "
        f"{samples_per_round} images per round, {len(steady)} steady rounds"
    )
    print(f"federation (Flower on Ray): {sim_img_s:8.1f} images/s")
    print(f"plain PyTorch loop:         {plain_img_s:8.1f} images/s")
    print(f"ratio:                      {ratio:8.3f}")
    print(f"one-time start-up:          {startup_s:8.1f} s (Ray, client discovery, first eval)")
    print(f"first round:                {records[0]['round_s']:8.1f} s")
    print(
        json.dumps(
            {
                "sim_img_s": round(sim_img_s, 2),
                "plain_img_s": round(plain_img_s, 2),
                "ratio": round(ratio, 4),
                "startup_s": round(startup_s, 2),
                "first_round_s": records[0]["round_s"],
                "clients": args.clients,
                "rounds": args.rounds,
                "model": args.model,
                "batch_size": args.batch_size,
                "samples_per_round": samples_per_round,
                "torch_threads_plain": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
