"""Time partitioning synthetic ImageNet-like labels; the last printed line is one JSON object.

Example::

    python scripts/bench_partition.py --samples 1281167 --classes 1000 --clients 1000 \
        --alpha 0.5 --scheme dirichlet --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from fedvision.data.partition import (
    SCHEMES,
    PartitionSpec,
    make_partition,
    partition_labels,
    summary_stats,
)


def synthetic_labels(samples: int, classes: int, seed: int = 0) -> np.ndarray:
    """Return class-sorted labels (as an ImageFolder scan gives) with ~samples/classes per class.

    Parameters
    ----------
    samples : int
        Number of labels.
    classes : int
        Number of classes; class sizes vary a little, as in ImageNet (732 to 1300 per class).
    seed : int
        Seed of the class sizes.
    """
    rng = np.random.default_rng(seed)
    # Most ImageNet classes are full; about one in ten has between 56% and 100% of the images.
    weights = np.where(rng.random(classes) < 0.1, rng.uniform(0.56, 1.0, classes), 1.0)
    sizes = rng.multinomial(samples, weights / weights.sum())
    return np.repeat(np.arange(classes, dtype=np.int64), sizes)


def _time_flwr_datasets(labels: np.ndarray, spec: PartitionSpec) -> float | None:
    """Time flwr-datasets' partitioner for the same spec (None when it has no equivalent)."""
    from datasets import Dataset
    from flwr_datasets import partitioner as fp

    if spec.scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_size,
            self_balancing=False,
            seed=spec.seed,
        )
    elif spec.scheme == "pathological":
        part = fp.PathologicalPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            seed=spec.seed,
        )
    elif spec.scheme == "iid":
        part = fp.IidPartitioner(num_partitions=spec.num_clients)
    else:
        return None
    start = time.perf_counter()
    part.dataset = Dataset.from_dict({"label": labels})
    for cid in range(spec.num_clients):
        part.load_partition(cid)  # the first call computes every client's indices
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1281167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--scheme", choices=SCHEMES, default="dirichlet")
    ap.add_argument("--classes-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-size", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--flwr-datasets",
        action="store_true",
        help="also time flwr-datasets' partitioner once (slow: ~15 s for the defaults)",
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)

    labels = synthetic_labels(args.samples, args.classes, args.seed)
    spec = PartitionSpec(
        scheme=args.scheme,
        num_clients=args.clients,
        alpha=args.alpha,
        classes_per_client=args.classes_per_client,
        min_size=args.min_size,
        seed=args.seed,
    )
    labels_times, make_times = [], []
    partition = None
    for _ in tqdm(range(args.repeats), desc="repeats", file=sys.stderr, disable=args.no_progress):
        start = time.perf_counter()
        partition_labels(labels, spec)
        labels_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        partition = make_partition(labels, spec)
        make_times.append(time.perf_counter() - start)
    assert partition is not None

    allidx = np.concatenate([*partition.train, *partition.val])
    covered = bool(
        allidx.size == labels.size
        and np.array_equal(np.bincount(allidx, minlength=labels.size), np.ones(labels.size))
    )
    summary = summary_stats(partition, labels)
    flwr_seconds = _time_flwr_datasets(labels, spec) if args.flwr_datasets else None

    print(
        f"{args.scheme} partition of {labels.size} labels / {args.classes} classes into "
        f"{args.clients} clients: make_partition best {min(make_times):.3f} s, "
        f"partition_labels best {min(labels_times):.3f} s (of {args.repeats})"
    )
    print(
        f"covers every index once: {covered}; sizes min/median/max "
        f"{summary['min_size']}/{summary['median_size']:g}/{summary['max_size']}; "
        f"mean classes {summary['mean_classes']:.1f}; mean TV {summary['mean_tv']:.3f}"
    )
    if flwr_seconds is not None:
        print(f"flwr-datasets partitioner, same spec: {flwr_seconds:.3f} s")
    result = {
        "seconds": round(min(make_times), 4),
        "partition_labels_seconds": round(min(labels_times), 4),
        "scheme": args.scheme,
        "alpha": args.alpha,
        "clients": args.clients,
        "samples": int(labels.size),
        "classes": args.classes,
        "repeats": args.repeats,
        "covered": covered,
        "mean_tv": round(summary["mean_tv"], 4),
        "flwr_datasets_seconds": None if flwr_seconds is None else round(flwr_seconds, 3),
    }
    print(json.dumps(result))
    return 0 if covered else 1


if __name__ == "__main__":
    sys.exit(main())
