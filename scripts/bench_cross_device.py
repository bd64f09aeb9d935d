"""Cross-device throughput: cohort execution and one Ray task per client, against the limit.

The setting is pfl-research's CIFAR-10 benchmark (``benchmarks/image_classification/configs/
baseline.yaml`` in apple/pfl-research: CIFAR-10 IID, 50 images per user, 50 users per round,
local batch 10, 1 local epoch, local lr 0.1, FedAvg, a small CNN, 1,500 central iterations) on
``../shared/data/cifar10``: 1,000 clients (IID, all of each client's images train), 50 sampled a
round, NIID-Bench's simple CNN (62,006 parameters; pfl's own small CNN is another network),
batch 10, 1 epoch, SGD lr 0.1 without momentum, no augmentation, evaluation only after the last
round. pfl weighs users equally (``weight_by_samples: false``); with 50 images each, FedAvg's
example weights are equal too.

Three measurements, each in one run of this script:

- **cohort**: ``fedvision run ... runtime.cohort_workers=W`` (W worker nodes, each training its
  share of the round's clients back to back on a resident model);
- **per-client**: the same run with ``runtime.cohort_workers=0`` (Flower's way: one Ray task per
  client per round);
- **limit**: W plain processes (bench_sim's plain loop: same model, SGD, batches, threads) training
  the very clients the cohort run sampled, one after another, with no federation at all; the
  median of ``--limit-repeats`` such runs (each lasts seconds, and swings with the machine).

Every side runs W processes of ``--cpus-per-client`` torch threads (Ray's rule for its actors,
checked by bench_sim's watcher). Steady state is rounds 2 .. R-1 (round 1 builds the model in
each worker, round R evaluates); images/s = the clients' training examples of those rounds over
the sum of their ``round_s``. ``ratio`` = cohort images/s / limit images/s; ``ratio_per_client``
the same for the per-client run. A ratio above 1 would mean the limit is unfair, not that the
federation is fast.

    python scripts/bench_cross_device.py                  # 20 rounds each side, about 10 min here
    python scripts/bench_cross_device.py --rounds 300 --eval-every 20 --skip-per-client --skip-limit

The second form is the accuracy curve: the cohort run alone, evaluated every 20 rounds (its
``curves.png`` and ``metrics.jsonl`` are in ``--out``). Prints a table; the last line is one JSON
object with every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedvision import constants as C
from fedvision.data.partition import load_partition
from fedvision.report.metrics import read_metrics
from fedvision.rundir import read_plan

HERE = Path(__file__).resolve().parent
CIFAR10 = HERE.parent.parent / "shared" / "data" / "cifar10"


def _bench_sim() -> Any:
    """scripts/bench_sim.py as a module: its federation runner, watcher and plain loop."""
    spec = importlib.util.spec_from_file_location("bench_sim", HERE / "bench_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sim"] = module
    spec.loader.exec_module(module)
    return module


def overrides(args: argparse.Namespace, workers: int) -> list[str]:
    """The ``fedvision run`` overrides of one side (``workers`` 0: one task per client)."""
    return [
        f"data.root={args.data_root}",
        "data.size=32",
        "model=simple_cnn",
        f"num_clients={args.clients}",
        f"num_rounds={args.rounds}",
        *(
            ["partition=iid"]
            if args.alpha is None
            # Dirichlet over 10,000 clients leaves some of them without an image: allowed, and
            # such a client trains nothing (weight 0) when sampled.
            else ["partition=dirichlet", f"partition.alpha={args.alpha}", "partition.min_size=0"]
        ),
        "partition.val_fraction=0.0",
        f"strategy.fraction_train={args.per_round / args.clients}",
        f"strategy.min_train_nodes={args.per_round}",
        "strategy.min_available_nodes=1",
        "client.local_epochs=1",
        "client.batch_size=10",
        "client.optimizer=sgd",
        "client.lr=0.1",
        "client.momentum=0.0",
        "client.weight_decay=0.0",
        "client.lr_schedule=constant",
        "client.augment=none",
        f"eval_every={args.eval_every or args.rounds}",
        f"runtime.num_cpus_per_client={args.cpus_per_client:g}",
        f"runtime.cohort_workers={workers}",
        f"seed={args.seed}",
        "progress=false",
        "tracking=none",
    ]


class MemoryWatcher:
    """Peak host memory of this process's descendants (the command, Ray and its workers).

    Counted: every process's private anonymous memory (``RssAnon``), plus the largest shared
    memory mapping (``RssShmem``: Ray's object store, mapped by many processes, counted once).
    Not counted: file-backed pages, the decoded image cache among them (a memmap the kernel
    pages in and can drop), and the libraries.
    """

    def __init__(self, bench: Any) -> None:
        self.bench, self.peak_mb = bench, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemoryWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            anon, shmem = 0, 0
            for pid in self.bench._descendants(os.getpid()):
                try:
                    status = Path(f"/proc/{pid}/status").read_text().splitlines()
                except OSError:
                    continue
                kb = {ln.split(":")[0]: ln.split()[1] for ln in status if ln.startswith("Rss")}
                anon += int(kb.get("RssAnon", 0))
                shmem = max(shmem, int(kb.get("RssShmem", 0)))
            self.peak_mb = max(self.peak_mb, (anon + shmem) / 1024)
            self._stop.wait(0.5)


def measure(bench: Any, args: argparse.Namespace, run_dir: Path, workers: int) -> dict[str, Any]:
    """One federation run; its steady-state images/s, start-up and what its workers did."""
    t0 = time.monotonic()
    with MemoryWatcher(bench) as memory:
        _, watcher = bench.run_federation(overrides(args, workers), run_dir, args.timeout)
    wall = time.monotonic() - t0
    records = [r for r in read_metrics(run_dir) if r["round"] >= 1]
    steady = records[1:-1]
    failed = sum(r["num_failures"] for r in steady)
    if failed and args.alpha is None:
        raise SystemExit(f"bench_cross_device: clients failed in {run_dir}; see its metrics")
    sizes = [len(t) for t in load_partition(run_dir / C.PARTITION_FILE).train]
    samples = sum(sizes[p] for r in steady for p in r["clients"])
    seconds = sum(r["round_s"] for r in steady)
    summary = json.loads((run_dir / C.RUN_SUMMARY).read_text())
    timings = summary.get("timings", {})
    last = records[-1]
    return {
        "img_s": samples / seconds,
        "round_s": seconds / len(steady),
        "samples": samples,
        "steady_rounds": len(steady),
        "wall_s": round(wall, 1),
        "beyond_data_s": round(timings["first_round_start"] - timings["data_ready"], 2)
        if "data_ready" in timings
        else None,
        "busy_threads": watcher.busy_threads_per_actor(),
        "actors": len(watcher.actor_ticks),
        "test_accuracy": last.get("test_accuracy"),
        "failed_clients": failed,  # with --alpha: clients holding no image
        "peak_memory_mb": round(memory.peak_mb),
        "population_start_s": round(timings["data_ready"] - timings["start"], 2)
        if "start" in timings and "data_ready" in timings
        else None,
        "clients": [r["clients"] for r in steady],
    }


def main() -> None:
    """Run the sides, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="cohort workers (and plain processes)")
    ap.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per worker")
    ap.add_argument("--eval-every", type=int, default=0, help="0: only after the last round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha (default: IID)")
    ap.add_argument("--data-root", type=Path, default=CIFAR10)
    ap.add_argument("--skip-per-client", action="store_true")
    ap.add_argument("--skip-limit", action="store_true")
    ap.add_argument("--limit-repeats", type=int, default=3, help="limit runs (median)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds, per side")
    ap.add_argument("--out", type=Path, default=None, help="folder for the run directories")
    args = ap.parse_args()
    if args.limit_repeats < 1:
        ap.error("--limit-repeats must be >= 1")
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (round 1 and the last round are not steady state)")
    if not (args.data_root / "train").is_dir():
        raise SystemExit(f"bench_cross_device: no CIFAR-10 ImageFolder at {args.data_root}")
    args.data_root = args.data_root.resolve()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedvision-xdev-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench = _bench_sim()
    t_start = time.monotonic()

    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    cohort = measure(bench, args, out / "cohort", args.workers)
    result["cohort"] = {k: v for k, v in cohort.items() if k != "clients"}
    if not args.skip_per_client:
        per_client = measure(bench, args, out / "per_client", 0)
        if per_client["clients"] != cohort["clients"]:
            raise SystemExit("bench_cross_device: the two runs sampled different clients")
        result["per_client"] = {k: v for k, v in per_client.items() if k != "clients"}
    if not args.skip_limit:
        plan = read_plan(out / "cohort")
        train = load_partition(out / "cohort" / C.PARTITION_FILE).train
        sets = [train[p] for rnd in cohort["clients"] for p in rnd]
        threads = max(int(args.cpus_per_client), 1)
        hp = {
            "threads": threads, "seed": args.seed, "model": "simple_cnn",
            "num_classes": plan.num_classes, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
            "batch_size": 10, "warmup_steps": 5, "rounds": 1, "epochs": 1,
        }  # fmt: skip
        # The limit's whole run is a few seconds, so one run swings with whatever else this
        # shared machine does then (5,161 to 8,987 images/s in one sitting): the median of
        # --limit-repeats runs.
        runs = [
            bench.run_plain(plan.train_cache, sets, args.workers, hp, args.timeout)
            for _ in range(args.limit_repeats)
        ]
        limit = sorted(runs, key=lambda r: r["img_s"])[len(runs) // 2]
        limit["img_s_runs"] = [round(r["img_s"]) for r in runs]
        result["limit"] = limit
        result["ratio"] = round(cohort["img_s"] / limit["img_s"], 3)
        if "per_client" in result:
            result["ratio_per_client"] = round(result["per_client"]["img_s"] / limit["img_s"], 3)
    result["total_s"] = round(time.monotonic() - t_start, 1)

    layout = f"{args.workers} workers x {args.cpus_per_client:g} CPU"
    print(
        f"cross-device benchmark ({args.clients} clients, {args.per_round} a round, {layout}), "
        f"steady rounds 2..{args.rounds - 1}"
    )
    print(f"{'side':<12} {'img/s':>8} {'s/round':>8} {'beyond data s':>14} {'peak MB':>8}")
    for side in ("cohort", "per_client"):
        if side in result:
            r = result[side]
            start, mb = r["beyond_data_s"] or 0.0, r["peak_memory_mb"]
            print(f"{side:<12} {r['img_s']:8.0f} {r['round_s']:8.2f} {start:14.2f} {mb:8d}")
    if "limit" in result:
        lim = result["limit"]
        runs = ", ".join(str(x) for x in lim["img_s_runs"])
        print(f"{'limit':<12} {lim['img_s']:8.0f}   (median of runs: {runs})")
        print(f"ratio (cohort / limit): {result['ratio']}")
        if "ratio_per_client" in result:
            print(f"ratio_per_client: {result['ratio_per_client']}")
    print(f"total: {result['total_s']} s; run directories in {out}")
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
