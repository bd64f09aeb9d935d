"""Throughput and start-up of ``fedvision run`` against a plain PyTorch loop doing the same work.

(a) The federation: ``fedvision run`` started as a command (a subprocess of this script): Flower's
simulation on Ray, N clients, FedAvg, IID partition, no augmentation, constant learning rate, no
evaluation in the timed rounds. Ray gives every client actor ``runtime.num_cpus_per_client`` CPUs
(1 by default) and, unless ``OMP_NUM_THREADS`` is set already, sets ``OMP_NUM_THREADS`` to that
number (floored, at least 1) in the actor's process when the actor is created
(``ray._private.utils.set_omp_num_threads_if_unset``). The ClientApp imports torch later, on the
actor's first message, so each simulated worker trains with that many torch threads: a throwaway
``num_cpus=1`` actor (Ray 2.55, torch 2.14) reports ``OMP_NUM_THREADS=1`` and
``torch.get_num_threads() == 1``. This script checks the real actors on every run: while the
federation runs it samples the CPU time of every thread of the ``ray::ClientAppActor`` processes
the command started and reports how many threads of each did the work (on the 2-core machine: 1,
no OpenMP thread busy). The federation keeps ``floor(cores / num_cpus_per_client)`` actors, so N
clients train on W = min(N, that) concurrent workers.

(b) The plain loop: the same work split the same way. W processes (``spawn``), each started with
``OMP_NUM_THREADS`` set and calling ``torch.set_num_threads`` at the federation's per-worker
thread count, each training its share of the clients' index sets (dealt largest first to the
least loaded process; equal IID partitions thus split as they do over Ray's actors) with a
textbook loop: the same model from ``build_model``, SGD with the config's lr, momentum and weight
decay (a fresh optimiser per client and round, as a FedAvg client builds), shuffled batches
gathered sorted from the same decoded-cache memmap, uint8 -> float by ``build_eval_transform()``,
cross-entropy, backward, step. The processes load everything and take a few warm-up steps before
a barrier; the timed part runs from the barrier to the last process's finish and is only
training. The processes do not wait for each other between rounds, as the federation must; the
table also shows the estimate with that wait (each round as long as its slowest process).

Steady state compares the federation's rounds 2 .. R-1 (round 1 builds the model in each worker,
round R evaluates) with the plain loop over the same number of samples (the clients' training
indices x local epochs x steady rounds). A round's ``round_s`` is all the server does: sending
weights, the clients' training, the replies, aggregation and the checkpoint write. Images/s =
samples / seconds on both sides; the ratio is federation / plain.

Start-up runs from this script's launch of the command to round 1's start, split with the
timestamps in ``summary.json``: import (Python, torch, flwr, hydra: until the Hydra task begins),
config check, Ray start (``fedvision run`` starts Ray itself before the data work and sends each
client slot a task that imports the ClientApp, so the workers' imports overlap what follows), data
(the dataset generated on first use or its decoded cache reused, partition, initial weights),
Flower set-up (until the ServerApp begins), round-0 evaluation (before discovery, so that it
overlaps the actors' start), discovery (the actors' start and their answers). "Beyond data" is
everything from data ready to round 1's start. Milestones seen from outside (to within 0.25 s):
a Ray daemon up, the first Ray worker process, a worker connected and idle, the last client actor
created. The clock starts at this script's launch of the command;
the command's own ``start`` (its process start, from /proc) should lie within a few hundredths of
a second of it, and ``proc_start_vs_launch`` in the JSON shows by how much.

    python scripts/bench_sim.py                       # resnet18, 32 px, 2 clients, 5 rounds
    python scripts/bench_sim.py --clients 4 --rounds 6 --model mobilenet_v3_small
    python scripts/bench_sim.py --data-root ../shared/data/imagenette --model mobilenet_v2 \
        --size 96 --clients 10 --fresh-cache    # real JPEGs; decode-once cache timed and sized

With ``--data-root`` the federation trains on that ImageFolder and the plain loop on the same
decoded cache; ``--fresh-cache`` gives the command an empty ``$FEDVISION_HOME``, so that the
start-up's "data" phase is the decode of every JPEG into the cache (the table prints its size).

Prints a table; the last line is one JSON object with every number. Uses ``$FEDVISION_HOME`` (the
built-in dataset is generated there on first use, which the first run's "data" then includes) and
leaves the run directory and the command's log in a temp folder unless ``--out`` names one. Run
it on an otherwise idle machine: other load changes both sides, and not by the same amount.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedvision import constants as C
from fedvision.data.cache import DecodedCache
from fedvision.data.partition import load_partition
from fedvision.data.transforms import build_eval_transform
from fedvision.models import build_model
from fedvision.report.metrics import read_metrics
from fedvision.rundir import read_plan

ACTOR_PREFIX = "ray::ClientAppActor"
RAY_DAEMONS = ("raylet", "gcs_server")
# A thread counts as a compute thread when it used at least this share of the busiest thread's
# CPU time (torch's OpenMP threads work about as much as the main thread when there are any).
BUSY_SHARE = 0.25


# ---------------------------------------------------------------------------------------------
# /proc helpers (Linux): which processes the command started, and how many threads computed
# ---------------------------------------------------------------------------------------------


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def thread_cpu_ticks(pid: int) -> list[int]:
    """User + system CPU ticks of each thread of ``pid`` (empty when it is gone)."""
    ticks = []
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return []
    for task in tasks:
        try:
            fields = Path(task.path, "stat").read_text().rsplit(")", 1)[1].split()
            ticks.append(int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    return ticks


def busy_threads(ticks: Sequence[int]) -> int | None:
    """Threads that used at least ``BUSY_SHARE`` of the busiest thread's CPU time."""
    if not ticks or max(ticks) == 0:
        return None
    return sum(t >= BUSY_SHARE * max(ticks) for t in ticks)


class ProcessWatcher:
    """Samples the processes below a pid while a command runs.

    Notes when Ray's daemons and each client actor first appear (every 0.25 s during start-up),
    keeps the last per-thread CPU sample of every client actor (so the numbers cover its whole
    life up to about a second before it ended) and the daemons' pids, so that none outlives the
    command. Once the actors have been up a few seconds it rescans only them (once a second) and
    the whole tree every 5 s, to stay out of the measured rounds' way.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.actor_ticks: dict[int, list[int]] = {}
        self.actor_seen: dict[int, float] = {}  # pid -> wall time first seen as a client actor
        self.daemons: dict[int, str] = {}
        # Wall time each kind of process was first seen: "daemon" (raylet, GCS), "worker" (a Ray
        # worker process started), "idle_worker" (one connected and waits for work).
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessWatcher:
        if Path("/proc/self/task").is_dir():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _scan(self) -> None:
        now = time.time()
        for pid in _descendants(self.root):
            cmd = _cmdline(pid)
            if cmd.startswith(ACTOR_PREFIX):
                self.actor_seen.setdefault(pid, now)
                if ticks := thread_cpu_ticks(pid):
                    self.actor_ticks[pid] = ticks
            elif Path(cmd.split(" ", 1)[0]).name in RAY_DAEMONS:
                self.daemons[pid] = cmd
                self.first_seen.setdefault("daemon", now)
            elif "default_worker.py" in cmd:
                self.first_seen.setdefault("worker", now)
            elif cmd.startswith("ray::IDLE"):
                self.first_seen.setdefault("idle_worker", now)

    def _loop(self) -> None:
        last_full = 0.0
        while not self._stop.is_set():
            settled = self.actor_seen and time.time() - max(self.actor_seen.values()) > 5
            if not settled or time.monotonic() - last_full > 5:
                self._scan()
                last_full = time.monotonic()
            else:
                for pid in self.actor_ticks:
                    if ticks := thread_cpu_ticks(pid):
                        self.actor_ticks[pid] = ticks
            self._stop.wait(1.0 if settled else 0.25)

    def busy_threads_per_actor(self) -> list[int]:
        """Compute threads of each client actor seen (actors that never trained are left out)."""
        return [b for t in self.actor_ticks.values() if (b := busy_threads(t)) is not None]

    def reap_daemons(self, grace_s: float = 10.0) -> list[int]:
        """Stop Ray daemons this command started that outlived it; return their pids."""
        deadline = time.monotonic() + grace_s
        left = [p for p, cmd in self.daemons.items() if _cmdline(p) == cmd]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [p for p in left if _cmdline(p) == self.daemons[p]]
        for pid in left:  # still the same command line, so still the process we saw
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left


# ---------------------------------------------------------------------------------------------
# (a) the federation, as a command
# ---------------------------------------------------------------------------------------------


def run_federation(
    overrides: list[str], run_dir: Path, timeout_s: float, env: dict[str, str] | None = None
) -> tuple[float, ProcessWatcher]:
    """Run ``fedvision run`` as a subprocess; return its launch time and what the watcher saw."""
    cmd = [sys.executable, "-m", "fedvision.cli", "run", *overrides, f"hydra.run.dir={run_dir}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        launched = time.time()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        with ProcessWatcher(proc.pid) as watcher:
            try:
                rc = proc.wait(timeout=timeout_s)
            except BaseException as exc:  # timeout, Ctrl-C: let fedvision stop Ray, then insist
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                watcher.reap_daemons(grace_s=0)
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise SystemExit(
                        f"bench_sim: the federation did not finish in {timeout_s:g} s; see {log}"
                    ) from None
                raise
    leftover = watcher.reap_daemons()
    if leftover:
        print(f"bench_sim: stopped Ray daemons left behind: {leftover}", file=sys.stderr)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"bench_sim: `{' '.join(cmd)}` failed (exit {rc}):\n{tail}")
    return launched, watcher


# ---------------------------------------------------------------------------------------------
# (b) the plain loop, in W processes
# ---------------------------------------------------------------------------------------------


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Sorted batches of ``order``; a trailing one-sample batch joins the previous one.

    The engine does the same (BatchNorm cannot train on one sample), so both sides take the
    same number of steps.
    """
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2:] = [np.concatenate(out[-2:])]
    return [np.sort(b) for b in out]


def plain_worker(
    rank: int,
    cache_dir: str,
    clients: list[np.ndarray],
    hp: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    """One plain process: train ``clients`` ``hp['rounds']`` times; report its timed span."""
    torch.set_num_threads(int(hp["threads"]))
    cache = DecodedCache.open(cache_dir)
    images, labels = cache.images, cache.labels
    torch.manual_seed(int(hp["seed"]))
    model = build_model(str(hp["model"]), int(hp["num_classes"]))
    model.train()
    to_float = build_eval_transform()
    rng = np.random.default_rng(int(hp["seed"]) + rank)

    def train(indices: np.ndarray, epochs: int, max_steps: int | None = None) -> int:
        # A fresh optimiser per client and round, as a FedAvg client builds one per call.
        opt = torch.optim.SGD(
            model.parameters(),
            lr=float(hp["lr"]),
            momentum=float(hp["momentum"]),
            weight_decay=float(hp["weight_decay"]),
        )
        seen = steps = 0
        for _ in range(epochs):
            for idx in _batches(rng.permutation(indices), int(hp["batch_size"])):
                if max_steps is not None and steps >= max_steps:
                    return seen
                x = to_float(torch.from_numpy(images[idx]))
                y = torch.from_numpy(labels[idx])
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                seen += len(idx)
                steps += 1
        return seen

    train(clients[0], 1, max_steps=int(hp["warmup_steps"]))  # not timed, like round 1
    barrier.wait()
    t0 = time.monotonic()  # CLOCK_MONOTONIC: comparable across the processes
    seen, round_s = 0, []
    for _ in range(int(hp["rounds"])):
        r0 = time.monotonic()
        seen += sum(train(idx, int(hp["epochs"])) for idx in clients)
        round_s.append(time.monotonic() - r0)
    t1 = time.monotonic()
    results.put(
        {
            "rank": rank,
            "t0": t0,
            "t1": t1,
            "samples": seen,
            "round_s": round_s,
            "threads": torch.get_num_threads(),
            "busy_threads": busy_threads(thread_cpu_ticks(os.getpid())),
        }
    )


def deal(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Clients (by index) per worker: largest first onto the least loaded worker."""
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = loads.index(min(loads))
        out[w].append(i)
        loads[w] += sizes[i]
    return out


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for processes started inside the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_plain(
    cache_dir: str,
    train_sets: list[np.ndarray],
    workers: int,
    hp: dict[str, Any],
    timeout_s: float,
) -> dict[str, Any]:
    """Train ``train_sets`` ``hp['rounds']`` times on ``workers`` spawned processes."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    shares = deal([len(s) for s in train_sets], workers)
    # Set before torch is imported in the child, as Ray does for an actor.
    with _env(OMP_NUM_THREADS=str(hp["threads"])):
        procs = [
            ctx.Process(
                target=plain_worker,
                args=(r, cache_dir, [train_sets[i] for i in share], hp, barrier, results),
                daemon=True,
            )
            for r, share in enumerate(shares)
        ]
        for p in procs:
            p.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < workers:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:  # check that nobody died
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit("bench_sim: a plain-loop process failed") from None
                if time.monotonic() > deadline:
                    raise SystemExit("bench_sim: the plain loop timed out") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    wall = max(g["t1"] for g in got) - min(g["t0"] for g in got)
    samples = sum(g["samples"] for g in got)
    busy = [g["busy_threads"] for g in got if g["busy_threads"] is not None]
    # What the same processes would take if, like FedAvg, each round waited for the slowest one
    # (an estimate from their own round times; shown, not used in the ratio).
    synced = sum(max(rounds) for rounds in zip(*(g["round_s"] for g in got), strict=True))
    return {
        "img_s": samples / wall,
        "wall_s": wall,
        "img_s_round_synced": samples / synced,
        "samples": samples,
        "threads": max(g["threads"] for g in got),
        "busy_threads": max(busy) if busy else None,
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def startup_parts(
    timings: dict[str, float], launched: float, watcher: ProcessWatcher
) -> dict[str, float | None]:
    """Seconds of each start-up phase, from the launch of the command to round 1's start.

    ``fedvision run`` starts Ray (and warms its workers) before the data work, the ServerApp
    evaluates round 0 before it discovers the clients, and "discovery" holds the actors' start
    and their first ClientApp call. The ``after_data`` milestones, from what the watcher saw
    (to within 0.25 s; negative: before the data was ready): a Ray daemon (GCS, raylet) up, a Ray
    worker process started, a worker connected and idle, the last client actor created, all
    clients answered.
    """
    t = {**timings, "launched": launched}
    spans = {
        "import": ("launched", "imported"),
        "ray": ("config_checked", "runtime_started"),
        "data": ("runtime_started", "data_ready"),
        "flower": ("data_ready", "server_start"),
        "round0_eval": ("server_start", "round0_done"),
        "discovery": ("round0_done", "clients_ready"),
        "to_round1": ("clients_ready", "first_round_start"),
        "total": ("launched", "first_round_start"),
        "beyond_data": ("data_ready", "first_round_start"),
    }
    out: dict[str, float | None] = {k: round(t[b] - t[a], 2) for k, (a, b) in spans.items()}
    out["config_check"] = round(t["config_checked"] - t["imported"], 2)
    ready = t["data_ready"]
    seen = {**watcher.first_seen}
    if watcher.actor_seen:
        seen["actors"] = max(watcher.actor_seen.values())
    for key in ("daemon", "worker", "idle_worker", "actors"):
        out[f"after_data_{key}"] = round(seen[key] - ready, 2) if key in seen else None
    out["after_data_clients_ready"] = round(t["clients_ready"] - ready, 2)
    # A check on the command's own start time (from /proc) against the launch seen from here.
    out["proc_start_vs_launch"] = round(t["start"] - launched, 2)
    return out


def main() -> None:
    """Run both sides, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32, help="image size in px")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client")
    ap.add_argument("--warmup-steps", type=int, default=5, help="plain loop, per process")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds, per side")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    ap.add_argument("--data-root", type=Path, default=None, help="ImageFolder (default: built-in)")
    ap.add_argument("--max-per-class", type=int, default=None, help="with --data-root")
    ap.add_argument(
        "--fresh-cache", action="store_true", help="decode into an empty FEDVISION_HOME (timed)"
    )
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (round 1 and the last round are not steady state)")

    overrides = [
        f"num_clients={args.clients}",
        f"num_rounds={args.rounds}",
        "partition=iid",
        f"model.name={args.model}",
        # Random weights, as the plain loop starts from: a pretrained start would add pretraining
        # to the start-up it measures (and changes nothing per round).
        "model.weights=none",
        f"data.size={args.size}",
        f"client.batch_size={args.batch_size}",
        f"client.local_epochs={args.local_epochs}",
        "client.augment=none",
        "client.lr_schedule=constant",
        f"eval_every={10**6}",
        f"runtime.num_cpus_per_client={args.cpus_per_client:g}",
        "strategy.min_train_nodes=1",
        "strategy.min_available_nodes=1",
        "progress=false",
    ]
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root.resolve()}")
        if args.max_per_class:
            overrides.append(f"data.max_per_class={args.max_per_class}")
    run_dir = (args.out or Path(tempfile.mkdtemp(prefix="fedvision-bench-")) / "run").resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = None
    if args.fresh_cache:
        env = {**os.environ, "FEDVISION_HOME": str(run_dir.parent / "fedvision-home")}
    launched, watcher = run_federation(overrides, run_dir, args.timeout, env)

    records = [r for r in read_metrics(run_dir) if r["round"] >= 1]
    summary = json.loads((run_dir / C.RUN_SUMMARY).read_text())
    config = _load_yaml(run_dir / C.RUN_CONFIG)
    plan = read_plan(run_dir)
    train_sets = load_partition(run_dir / C.PARTITION_FILE).train
    steady = records[1:-1]
    if any(r["num_failures"] for r in steady):
        raise SystemExit("bench_sim: clients failed in steady rounds; the numbers would mislead")
    samples = sum(len(train_sets[p]) for r in steady for p in r["clients"]) * args.local_epochs
    sim_s = sum(r["round_s"] for r in steady)
    sim_img_s = samples / sim_s

    # The same worker layout as the federation: Ray's rule for actors and their threads.
    cores = os.cpu_count() or 1
    env_threads = os.environ.get("OMP_NUM_THREADS")
    threads = int(env_threads) if env_threads else max(math.floor(args.cpus_per_client), 1)
    actors_seen = len(watcher.actor_ticks)
    pool = actors_seen or max(math.floor(cores / args.cpus_per_client), 1)
    workers = min(args.clients, pool)
    busy_sim = watcher.busy_threads_per_actor()
    if busy_sim and max(busy_sim) != threads:
        # Then something in the actors set the thread count; the plain side would not match.
        print(
            f"bench_sim: federation workers computed on {_fmt_list(busy_sim)} threads, the plain "
            f"loop will use {threads}; the comparison is off",
            file=sys.stderr,
        )
    hp = {
        "model": args.model,
        "num_classes": plan.num_classes,
        "batch_size": args.batch_size,
        "epochs": args.local_epochs,
        "rounds": len(steady),
        "lr": float(config["client"]["lr"]),
        "momentum": float(config["client"]["momentum"]),
        "weight_decay": float(config["client"]["weight_decay"]),
        "seed": int(config["seed"]),
        "threads": threads,
        "warmup_steps": args.warmup_steps,
    }
    # The federation trains the clients of each steady round, all of them every round here.
    plain = run_plain(plan.train_cache, list(train_sets), workers, hp, args.timeout)
    if plain["samples"] != samples:
        print(
            f"bench_sim: plain loop trained {plain['samples']} samples, the federation {samples}",
            file=sys.stderr,
        )
    ratio = sim_img_s / plain["img_s"]
    start = startup_parts(summary["timings"], launched, watcher)
    cache_mb = round(_size_mb(plan.train_cache) + _size_mb(plan.test_cache), 1)

    print(
        f"model {args.model}, {args.clients} clients on {workers} workers x {threads} thread(s), "
        f"batch {args.batch_size}, {samples // len(steady)} images per round, "
        f"{len(steady)} steady rounds (of {args.rounds})"
    )
    sec = "{:8.2f} s".format
    rows = [
        ("federation (fedvision run)", f"{sim_img_s:8.1f} images/s in {sim_s:.1f} s"),
        (
            f"plain loop, {workers} processes",
            f"{plain['img_s']:8.1f} images/s in {plain['wall_s']:.1f} s",
        ),
        ("  (rounds synced, estimate)", f"{plain['img_s_round_synced']:8.1f} images/s"),
        ("ratio (goal >= 0.95)", f"{ratio:8.3f}"),
        (
            "compute threads per worker",
            f"federation {_fmt_list(busy_sim)}, plain {plain['busy_threads']}",
        ),
        ("start-up to round 1", sec(start["total"])),
        ("  import (launch -> Hydra task)", sec(start["import"])),
        ("  config check", sec(start["config_check"])),
        ("  Ray start (workers warm up after)", sec(start["ray"])),
        ("  data (data, partition, weights)", sec(start["data"])),
        ("  Flower set-up", sec(start["flower"])),
        ("  round-0 evaluation", sec(start["round0_eval"])),
        ("  client discovery (actors, imports)", sec(start["discovery"])),
        ("    after data: Ray daemons up", _sec_or_na(start["after_data_daemon"])),
        ("    after data: first worker", _sec_or_na(start["after_data_worker"])),
        ("    after data: a worker idle", _sec_or_na(start["after_data_idle_worker"])),
        ("    after data: actors created", _sec_or_na(start["after_data_actors"])),
        ("    after data: clients answered", sec(start["after_data_clients_ready"])),
        ("  other", sec(start["to_round1"])),
        ("beyond data (goal <= 5 s)", sec(start["beyond_data"])),
        ("decoded cache (train + test)", f"{cache_mb:8.1f} MB"),
        ("round 1, last round", f"{sec(records[0]['round_s'])}, {records[-1]['round_s']:.2f} s"),
    ]
    for label, value in rows:
        print(f"{label:34s} {value}")
    print(
        json.dumps(
            {
                "ratio": round(ratio, 4),
                "sim_img_s": round(sim_img_s, 2),
                "plain_img_s": round(plain["img_s"], 2),
                "plain_img_s_round_synced": round(plain["img_s_round_synced"], 2),
                "sim_steady_s": round(sim_s, 2),
                "plain_wall_s": round(plain["wall_s"], 2),
                "startup_s": start,
                "first_round_s": records[0]["round_s"],
                "last_round_s": records[-1]["round_s"],
                "steady_round_s": [r["round_s"] for r in steady],
                "clients": args.clients,
                "rounds": args.rounds,
                "steady_rounds": len(steady),
                "model": args.model,
                "batch_size": args.batch_size,
                "local_epochs": args.local_epochs,
                "samples_per_round": samples // len(steady),
                "workers": workers,
                "actors_seen": actors_seen,
                "cores": cores,
                "threads_per_worker_sim": threads,
                "threads_per_worker_plain": plain["threads"],
                "busy_threads_sim": busy_sim,
                "busy_threads_plain": plain["busy_threads"],
                "run_dir": str(run_dir),
                "data_root": None if args.data_root is None else str(args.data_root),
                "fresh_cache": args.fresh_cache,
                "cache_mb": cache_mb,
            }
        )
    )


def _size_mb(path: str) -> float:
    """Megabytes of a decoded cache: the file, or every file under the folder."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def _sec_or_na(value: float | None) -> str:
    return "     n/a" if value is None else f"{value:8.2f} s"


def _fmt_list(values: list[int]) -> str:
    return "/".join(map(str, values)) if values else "n/a"


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


if __name__ == "__main__":
    main()
