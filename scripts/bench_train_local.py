"""Per-call cost of ``train_local`` for a tiny cross-device client, against a plain PyTorch loop.

The setting is ``scripts/bench_cross_device.py``'s client as the cohort worker trains it
(``fedvision/fl/cohort_clientapp.py``: a resident model reset to the round's weights, then
``train_local(model, images, labels, idx, to_train_config(record, pid), device)``): 45 CIFAR-10
sized images (uint8 ``[3, 32, 32]``), NIID-Bench's ``simple_cnn``, batch 10 (5 steps), 1 epoch,
SGD lr 0.1 without momentum or weight decay, no augmentation, raw ``[0, 1]`` pixels, CPU, one
torch thread, one process, no Flower, no Ray.

The plain loop does the same work the textbook way (``scripts/bench_sim.py``'s loop): a fresh SGD
per client, a shuffled permutation cut into sorted batches, ``images[idx]`` -> uint8 tensor ->
``build_eval_transform("none")`` (the engine's float conversion), cross-entropy, backward, step.
Both sides start every client from the same weights (reset outside the timed part, as the cohort
worker does) and are timed per call with ``perf_counter``; the two sides alternate call by call
over ``--clients`` clients, a block repeated ``--repeats`` times after one warm-up block, and the
median block gives each side's ms per call.

    python scripts/bench_train_local.py                       # synthetic CIFAR-10-shaped arrays
    python scripts/bench_train_local.py --cache ../shared/data/cifar10/<decoded cache dir>
    python scripts/bench_train_local.py --profile 20          # + cProfile of train_local

The last line is JSON: ``train_local_ms`` and ``plain_ms`` (per call), ``ratio`` = plain /
train_local (the throughput ratio, as bench_sim reports it; 1 is the plain loop's speed) and
``slowdown`` = train_local / plain.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedvision.data.transforms import build_eval_transform
from fedvision.engine import TrainConfig, train_local
from fedvision.models import build_model

CPU = torch.device("cpu")


def cross_device_config(seed: int) -> TrainConfig:
    """The TrainConfig a cohort worker builds from bench_cross_device's round config.

    ``amp`` and ``channels_last`` are not in a round's record, so they keep their defaults (on,
    but used on CUDA only); ``normalise`` is simple_cnn's ``none``.
    """
    return TrainConfig(
        epochs=1,
        max_steps=None,
        batch_size=10,
        lr=0.1,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        augment="none",
        normalise="none",
        bn_mode="train",
        backbone_lr_factor=1.0,
        seed=seed,
    )


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10-shaped uint8 images ``[n, 3, 32, 32]`` and int64 labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return images, rng.integers(0, 10, size=n).astype(np.int64)


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """bench_sim's batching: sorted batches, a trailing one-sample batch folded in."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2:] = [np.concatenate(out[-2:])]
    return [np.sort(b) for b in out]


def plain_call(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    to_float: object,
) -> int:
    """One client the textbook way; returns the samples seen."""
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    seen = 0
    for idx in _batches(rng.permutation(indices), cfg.batch_size):
        x = to_float(torch.from_numpy(images[idx]))  # type: ignore[operator]
        y = torch.from_numpy(labels[idx])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen += len(idx)
    return seen


def main() -> None:
    """Time both sides and print ms per call; the last line is JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--clients", type=int, default=200, help="calls per block and side")
    ap.add_argument("--repeats", type=int, default=5, help="blocks per side (median is kept)")
    ap.add_argument("--client-size", type=int, default=45)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--cache", default=None, help="a decoded cache dir instead of synthetic data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, help="also cProfile this many calls")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.cache:
        from fedvision.data.cache import DecodedCache

        cache = DecodedCache.open(args.cache)
        images, labels = cache.images, np.asarray(cache.labels, dtype=np.int64)
    else:
        images, labels = synthetic_data(args.images, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    clients = [
        rng.choice(len(labels), size=args.client_size, replace=False).astype(np.int64)
        for _ in range(args.clients)
    ]
    torch.manual_seed(args.seed)
    model = build_model("simple_cnn", 10)
    model.train()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    to_float = build_eval_transform(normalise="none")
    plain_rng = np.random.default_rng(args.seed + 2)

    def engine_call(pid: int, idx: np.ndarray) -> float:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        train_local(model, images, labels, idx, cross_device_config(pid), CPU)
        return time.perf_counter() - t0

    def plain_call_timed(pid: int, idx: np.ndarray) -> float:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        plain_call(model, images, labels, idx, cross_device_config(pid), plain_rng, to_float)
        return time.perf_counter() - t0

    def block() -> tuple[float, float]:
        """ms per call of each side over all clients; the sides alternate call by call (and
        which goes first alternates too), so a change of load elsewhere hits both alike."""
        eng = plain = 0.0
        for pid, idx in enumerate(clients):
            if pid % 2:
                plain += plain_call_timed(pid, idx)
                eng += engine_call(pid, idx)
            else:
                eng += engine_call(pid, idx)
                plain += plain_call_timed(pid, idx)
        return 1000 * eng / len(clients), 1000 * plain / len(clients)

    block()  # warm-up: allocator, kernels, first-call imports
    engine_ms, plain_ms = [], []
    for _ in range(args.repeats):
        e, p = block()
        engine_ms.append(e)
        plain_ms.append(p)
    t_eng, t_plain = statistics.median(engine_ms), statistics.median(plain_ms)

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for pid, idx in enumerate(clients[: args.profile]):
            model.load_state_dict(start)
            train_local(model, images, labels, idx, cross_device_config(pid), CPU)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    for name, ms, blocks in (("train_local", t_eng, engine_ms), ("plain loop", t_plain, plain_ms)):
        print(f"{name:<12} {ms:7.2f} ms/call  (blocks: {', '.join(f'{t:.2f}' for t in blocks)})")
    print(f"slowdown     {t_eng / t_plain:7.3f} x")
    print(
        json.dumps(
            {
                "train_local_ms": round(t_eng, 3),
                "plain_ms": round(t_plain, 3),
                "ratio": round(t_plain / t_eng, 3),
                "slowdown": round(t_eng / t_plain, 3),
                "clients": args.clients,
                "repeats": args.repeats,
                "client_size": args.client_size,
                "threads": torch.get_num_threads(),
                "data": args.cache or f"synthetic uint8 [{len(labels)}, 3, 32, 32]",
            }
        )
    )


if __name__ == "__main__":
    main()
