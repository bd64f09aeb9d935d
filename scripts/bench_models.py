"""Training throughput (images/s) of small torchvision CNNs on this CPU, through ``train_local``.

Each row also runs a plain PyTorch loop doing the same work (same batch gathering, augmentation,
model, optimiser) so that the engine's overhead is a ratio measured in the same run.

    python scripts/bench_models.py     # default models, 32 and 64 px, 1 and 2 threads
    python scripts/bench_models.py --models resnet18 --sizes 64 --threads 1

Prints a table and, last, one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedvision.data.transforms import build_train_transform
from fedvision.engine import TrainConfig, train_local
from fedvision.models import build_model, model_num_bytes

DEFAULT_MODELS = (
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "mnasnet0_5",
    "regnet_x_400mf",
    "efficientnet_b0",
)


def _plain_loop(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    steps: int,
) -> float:
    """The reference: the same work written as the shortest PyTorch loop; returns images/s."""
    gen = torch.Generator().manual_seed(cfg.seed)
    transform = build_train_transform(cfg.augment)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    model.train()
    order = torch.randperm(len(labels), generator=gen).numpy()
    start = time.perf_counter()
    for step in range(steps):
        idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        x = transform(torch.from_numpy(images[idx]), generator=gen)
        y = torch.from_numpy(labels[idx])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def bench_one(
    name: str, size: int, threads: int, batch_size: int, steps: int, warmup: int, repeats: int
) -> dict[str, float | int | str]:
    """Measure one (model, input size, threads) cell: engine and plain-loop images/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = batch_size * (steps + warmup)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    model = build_model(name, 10)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, augment="light")
    indices = np.arange(n, dtype=np.int64)
    warm = TrainConfig(**{**vars(cfg), "max_steps": warmup})
    timed = TrainConfig(**{**vars(cfg), "max_steps": steps})
    train_local(model, images, labels, indices, warm, "cpu")
    _plain_loop(model, images, labels, cfg, warmup)
    engine_ips = plain_ips = 0.0
    # Interleaved repeats, best of each: the machine is shared, so single runs are noisy.
    for _ in range(repeats):
        res = train_local(model, images, labels, indices, timed, "cpu")
        engine_ips = max(engine_ips, res.samples_seen / res.seconds)
        plain_ips = max(plain_ips, _plain_loop(model, images, labels, cfg, steps))
    return {
        "model": name,
        "size": size,
        "threads": threads,
        "batch_size": batch_size,
        "engine_img_s": round(engine_ips, 1),
        "plain_img_s": round(plain_ips, 1),
        "ratio": round(engine_ips / plain_ips, 3),
        "mbytes": round(model_num_bytes(model) / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark grid and print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--round-images",
        type=int,
        default=3000,
        help="images trained per federated round, for the seconds-per-round estimate",
    )
    parser.add_argument(
        "--cores", type=int, default=2, help="cores shared by clients training in parallel"
    )
    args = parser.parse_args(argv)

    rows = []
    header = (
        f"{'model':<20} {'px':>3} {'thr':>3} {'engine img/s':>12} {'plain img/s':>11} "
        f"{'ratio':>5} {'MiB':>6} {'s/round':>7}"
    )
    print(header, file=sys.stderr)
    for threads in args.threads:
        for size in args.sizes:
            for name in args.models:
                row = bench_one(
                    name, size, threads, args.batch_size, args.steps, args.warmup, args.repeats
                )
                # One epoch over round_images; cores // threads clients train in parallel.
                parallel = max(1, args.cores // threads)
                row["s_per_round"] = round(args.round_images / (parallel * row["engine_img_s"]), 1)
                rows.append(row)
                print(
                    f"{name:<20} {size:>3} {threads:>3} {row['engine_img_s']:>12} "
                    f"{row['plain_img_s']:>11} {row['ratio']:>5} {row['mbytes']:>6} "
                    f"{row['s_per_round']:>7}",
                    file=sys.stderr,
                    flush=True,
                )
    print(json.dumps({"bench": "models", "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
