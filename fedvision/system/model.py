"""System heterogeneity simulated deterministically on one machine: devices, links, a clock.

Every client (partition) gets a device profile once per run: a compute speed in samples per
second (device tiers, a lognormal, or a trace file of measured devices) and a link bandwidth up
and down. Each round some sampled clients drop out at random, each may get its own amount of local
work, and a deadline (in simulated seconds) either drops the clients that miss it or gives them
only as many local steps as fit (FedProx's inexact local solutions, Li et al. 2020). A simulated
clock adds up each round's duration from the work the clients report.

Everything here is plain Python and numpy, so it is testable without Flower; the round loop's
glue is :mod:`fedvision.system.round`. Every draw comes from a generator seeded by the run's
seed and a stream number (and the round and partition where it changes per round): reruns and
resumed runs see the same devices, dropouts and budgets, and no global RNG is touched.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedvision.errors import FedvisionError

DISTRIBUTIONS = ("tiers", "lognormal", "trace")
POLICIES = ("drop", "partial")
MB = 1e6  # bandwidths are in MB/s (10^6 bytes per second)
# A float tolerance: a client that takes exactly the deadline makes it.
EPS = 1e-9
# Seed-sequence streams: independent draws for each kind of randomness.
STREAM_SPEED, STREAM_LINK, STREAM_TRACE, STREAM_DROPOUT, STREAM_STEPS = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SystemConfig:
    """The ``system`` config group (see ``conf/system/*.yaml`` for what each key means)."""

    distribution: str
    tiers: tuple[float, ...] = ()
    tier_weights: tuple[float, ...] | None = None
    median_speed: float = 20.0
    sigma: float = 0.5
    trace: str | None = None
    down_mb_s: float | None = None
    up_mb_s: float | None = None
    bandwidth_sigma: float = 0.0
    deadline_s: float | None = None
    deadline_policy: str = "drop"
    dropout: float = 0.0
    local_steps: tuple[int, int] | None = None
    seed: int | None = None

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> SystemConfig | None:
        """Read and check the group; ``None`` for an empty group (``system=none``)."""
        if not d:
            return None
        # Keys and types were checked with the whole config (fedvision.schema.check_types).
        kw = dict(d)
        for f in fields(cls):  # YAML gives ints for floats
            if f.name in kw and kw[f.name] is not None and f.type in ("float", "float | None"):
                kw[f.name] = float(kw[f.name])
        for key in ("tiers", "tier_weights"):
            if kw.get(key) is not None:
                kw[key] = tuple(float(x) for x in kw[key])
        if kw.get("local_steps") is not None:
            steps = [int(x) for x in kw["local_steps"]]
            if len(steps) != 2:
                raise FedvisionError(
                    f"system.local_steps={list(kw['local_steps'])} must be [min, max]"
                )
            kw["local_steps"] = (steps[0], steps[1])
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse impossible values with one line that names the key."""
        if self.distribution not in DISTRIBUTIONS:
            raise FedvisionError(
                f"system.distribution={self.distribution!r} is unknown; use one of "
                f"{', '.join(DISTRIBUTIONS)}"
            )
        if self.distribution == "tiers":
            if not self.tiers or any(not s > 0 for s in self.tiers):
                raise FedvisionError(
                    f"system.tiers={list(self.tiers)}: give one or more speeds > 0 (samples/s)"
                )
            w = self.tier_weights
            if w is not None and (
                len(w) != len(self.tiers) or any(x < 0 for x in w) or not sum(w) > 0
            ):
                raise FedvisionError(
                    f"system.tier_weights={list(w)}: one weight >= 0 per tier, not all 0"
                )
        if self.distribution == "lognormal" and not (self.median_speed > 0 and self.sigma >= 0):
            raise FedvisionError(
                f"system.median_speed={self.median_speed} must be > 0 and system.sigma="
                f"{self.sigma} >= 0"
            )
        if self.distribution == "trace" and not self.trace:
            raise FedvisionError("system.distribution=trace needs system.trace=PATH (CSV or JSON)")
        for key in ("down_mb_s", "up_mb_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise FedvisionError(f"system.{key}={value} must be > 0 (null: no transfer time)")
        if self.bandwidth_sigma < 0:
            raise FedvisionError(f"system.bandwidth_sigma={self.bandwidth_sigma} must be >= 0")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise FedvisionError(
                f"system.deadline_s={self.deadline_s} must be > 0 (null: no deadline)"
            )
        if self.deadline_policy not in POLICIES:
            raise FedvisionError(
                f"system.deadline_policy={self.deadline_policy!r} is unknown; use "
                f"{' or '.join(POLICIES)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise FedvisionError(
                f"system.dropout={self.dropout} must lie in [0, 1): at 1 no client ever trains"
            )
        if self.local_steps is not None and not 1 <= self.local_steps[0] <= self.local_steps[1]:
            raise FedvisionError(
                f"system.local_steps={list(self.local_steps)} must be [min, max] with "
                "1 <= min <= max"
            )


@dataclass(frozen=True)
class Profile:
    """One client's simulated device: compute speed and link bandwidth (inf: instant)."""

    speed: float  # samples of local training per second
    down_bps: float = math.inf  # bytes per second, server -> client
    up_bps: float = math.inf  # bytes per second, client -> server

    def transfer_s(self, bytes_down: int, bytes_up: int) -> float:
        """Seconds to receive ``bytes_down`` and send ``bytes_up``."""
        return bytes_down / self.down_bps + bytes_up / self.up_bps

    def seconds(self, samples: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds of a round: download, train on ``samples``, upload."""
        return self.transfer_s(bytes_down, bytes_up) + samples / self.speed


def _positive(value: Any, what: str, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FedvisionError(f"{where}: {what}={value!r} is no number") from None
    if not (x > 0 and math.isfinite(x)):
        raise FedvisionError(f"{where}: {what}={value!r} must be a finite number > 0")
    return x


def read_trace(path: str | Path) -> list[dict[str, float]]:
    """Read a device trace: CSV with a header, or JSON (a list of objects).

    Columns: ``speed`` (samples/s, required), ``down_mb_s`` and ``up_mb_s`` (MB/s, optional),
    ``partition`` (optional: pins a row to a client; without it rows are drawn per client).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedvisionError(f"system.trace={path}: no such file; give a CSV or JSON device trace")
    try:
        if p.suffix.lower() == ".json":
            rows = json.loads(p.read_text())
        else:
            with p.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FedvisionError(f"system.trace={path}: cannot read it: {reason}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise FedvisionError(
            f"system.trace={path}: expected a non-empty list of devices with a 'speed' "
            "(a CSV with a header row, or a JSON list of objects)"
        )
    out = []
    for i, row in enumerate(rows):
        where = f"system.trace={path}, device {i}"
        if row.get("speed") in (None, ""):
            raise FedvisionError(f"{where}: no 'speed' (samples/s)")
        dev = {"speed": _positive(row["speed"], "speed", where)}
        for key in ("down_mb_s", "up_mb_s"):
            if row.get(key) not in (None, ""):
                dev[key] = _positive(row[key], key, where)
        if row.get("partition") not in (None, ""):
            try:
                dev["partition"] = int(row["partition"])
            except (TypeError, ValueError):
                raise FedvisionError(
                    f"{where}: partition={row['partition']!r} is no integer"
                ) from None
        out.append(dev)
    return out


def _trace_rows(
    rows: Sequence[dict[str, float]], num_clients: int, seed: int, path: str
) -> list[dict[str, float]]:
    """The trace row of each client: pinned by ``partition``, else drawn (with replacement)."""
    pinned = [r for r in rows if "partition" in r]
    if not pinned:
        rng = np.random.default_rng([seed, STREAM_TRACE])
        return [rows[int(i)] for i in rng.integers(0, len(rows), size=num_clients)]
    if len(pinned) != len(rows):
        raise FedvisionError(f"system.trace={path}: give 'partition' on every row or on none")
    by_pid = {int(r["partition"]): r for r in rows}
    if len(by_pid) != len(rows) or set(by_pid) != set(range(num_clients)):
        raise FedvisionError(
            f"system.trace={path}: its partitions {sorted(by_pid)[:5]}... must be 0.."
            f"{num_clients - 1} (num_clients), each once"
        )
    return [by_pid[p] for p in range(num_clients)]


def draw_profiles(cfg: SystemConfig, num_clients: int, seed: int) -> list[Profile]:
    """Each client's device, index = partition id; the same for the same seed and config."""
    if cfg.distribution == "tiers":
        rng = np.random.default_rng([seed, STREAM_SPEED])
        w = np.asarray(cfg.tier_weights or [1.0] * len(cfg.tiers), dtype=float)
        tier = rng.choice(len(cfg.tiers), size=num_clients, p=w / w.sum())
        speeds = [cfg.tiers[int(t)] for t in tier]
        rows: list[dict[str, float]] = [{} for _ in range(num_clients)]
    elif cfg.distribution == "lognormal":
        rng = np.random.default_rng([seed, STREAM_SPEED])
        draws = rng.lognormal(math.log(cfg.median_speed), cfg.sigma, size=num_clients)
        speeds = [float(x) for x in draws]
        rows = [{} for _ in range(num_clients)]
    else:
        assert cfg.trace is not None  # checked by SystemConfig.check
        rows = _trace_rows(read_trace(cfg.trace), num_clients, seed, cfg.trace)
        speeds = [r["speed"] for r in rows]
    # Link spread: one lognormal factor per client and direction around the configured medians.
    link = np.random.default_rng([seed, STREAM_LINK]).lognormal(
        0.0, cfg.bandwidth_sigma, size=(num_clients, 2)
    )
    out = []
    for p in range(num_clients):
        bw = []
        for j, key in enumerate(("down_mb_s", "up_mb_s")):
            mb_s = rows[p].get(key)
            if mb_s is None and getattr(cfg, key) is not None:
                mb_s = getattr(cfg, key) * float(link[p, j])
            bw.append(math.inf if mb_s is None else mb_s * MB)
        out.append(Profile(speed=float(speeds[p]), down_bps=bw[0], up_bps=bw[1]))
    return out


def _uniform(seed: int, stream: int, server_round: int, partition: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, server_round, partition])


def drops_out(seed: int, server_round: int, partition: int, p: float) -> bool:
    """Whether a sampled client drops out this round (probability ``p``, seeded)."""
    return p > 0 and float(_uniform(seed, STREAM_DROPOUT, server_round, partition).random()) < p


def local_steps_for(seed: int, server_round: int, partition: int, low: int, high: int) -> int:
    """A client's local steps this round, uniform in ``[low, high]`` (seeded)."""
    rng = _uniform(seed, STREAM_STEPS, server_round, partition)
    return int(rng.integers(low, high + 1))


def step_budget(
    profile: Profile, batch_size: int, deadline_s: float, bytes_down: int, bytes_up: int
) -> int:
    """Local steps that fit before the deadline: floor((deadline - transfer) / time per step).

    A step processes ``batch_size`` samples, so it takes ``batch_size / speed`` seconds.
    """
    left = deadline_s - profile.transfer_s(bytes_down, bytes_up)
    if left <= 0:
        return 0
    return math.floor(left / (batch_size / profile.speed) + EPS)


@dataclass(frozen=True)
class ClientPlan:
    """What the server does with one sampled client this round.

    ``send`` False: not sent (``reason`` says why: dropout, or deadline when not even one step
    fits). ``steps``: the local-step cap to send (None: the round config's own); ``steps_only``:
    the cap alone sets the work (local epochs 0), as under variable local work.
    """

    partition: int
    send: bool
    steps: int | None = None
    steps_only: bool = False
    reason: str | None = None
    bytes_down: int = 0


@dataclass
class ClientRun:
    """One sent client's reported work this round, and its simulated seconds."""

    partition: int
    steps: int
    samples: int
    bytes_down: int
    bytes_up: int
    sim_s: float


@dataclass
class RoundOutcome:
    """A round on the simulated clock: who counts, who was dropped, how long it took."""

    accepted: list[int]
    dropped: list[dict[str, Any]]
    sim_round_s: float
    clients: list[ClientRun] = field(default_factory=list)


class SystemModel:
    """A run's simulated devices; plans each round's clients and times the round.

    Parameters
    ----------
    cfg : the checked ``system`` group.
    num_clients : clients of the run (partition ids 0..num_clients-1).
    seed : the run's seed (``cfg.seed`` overrides it: the same devices under every training seed).
    """

    def __init__(self, cfg: SystemConfig, num_clients: int, seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed if cfg.seed is None else cfg.seed)
        self.profiles = draw_profiles(cfg, int(num_clients), self.seed)

    def plan(
        self,
        server_round: int,
        partition: int,
        bytes_down: int,
        batch_size: int,
        local_steps: int | None,
    ) -> ClientPlan:
        """Decide for one sampled client: drop out, or send with which step cap.

        ``local_steps`` is the round config's cap (None: none). The upload is assumed to weigh
        what the download does (fedvision's messages carry the same shared part both ways).
        """
        cfg = self.cfg
        if drops_out(self.seed, server_round, partition, cfg.dropout):
            return ClientPlan(partition, False, reason="dropout", bytes_down=bytes_down)
        steps, steps_only = local_steps, False
        if cfg.local_steps is not None:
            steps = local_steps_for(self.seed, server_round, partition, *cfg.local_steps)
            steps_only = True
        if cfg.deadline_s is not None and cfg.deadline_policy == "partial":
            budget = step_budget(
                self.profiles[partition], batch_size, cfg.deadline_s, bytes_down, bytes_down
            )
            if budget < 1:
                return ClientPlan(partition, False, reason="deadline", bytes_down=bytes_down)
            steps = budget if steps is None else min(steps, budget)
        return ClientPlan(partition, True, steps, steps_only, bytes_down=bytes_down)

    def outcome(
        self, plans: Sequence[ClientPlan], work: Mapping[int, tuple[int, int, int]]
    ) -> RoundOutcome:
        """Time the round from what each client reported: ``work[pid] = (steps, samples, up)``.

        A client's time is download + samples / speed + upload. Under ``deadline_policy=drop`` a
        client later than the deadline is dropped. The round lasts until its slowest accepted
        client, or the whole deadline when a sampled client did not deliver (dropped out or
        late): the server cannot know that before the deadline. Without a deadline a dropout
        costs no time (the server sees the client leave). Sampled clients that failed for real
        (no entry in ``work``) are the round loop's failures, not timed here.
        """
        cfg = self.cfg
        dropped = [{"partition": p.partition, "reason": p.reason} for p in plans if not p.send]
        runs, accepted = [], []
        for p in plans:
            if not p.send or p.partition not in work:
                continue
            steps, samples, up = work[p.partition]
            t = self.profiles[p.partition].seconds(samples, p.bytes_down, up)
            runs.append(ClientRun(p.partition, steps, samples, p.bytes_down, up, t))
            late = cfg.deadline_policy == "drop" and is_late(t, cfg.deadline_s)
            if late:
                dropped.append({"partition": p.partition, "reason": "deadline", "sim_s": t})
            else:
                accepted.append(p.partition)
        finish = max((r.sim_s for r in runs if r.partition in accepted), default=0.0)
        if cfg.deadline_s is not None and dropped:
            finish = cfg.deadline_s
        dropped.sort(key=lambda d: d["partition"])
        return RoundOutcome(sorted(accepted), dropped, finish, runs)


def is_late(sim_s: float, deadline_s: float | None) -> bool:
    """Whether a client that took ``sim_s`` simulated seconds misses ``deadline_s`` (None: none)."""
    return deadline_s is not None and sim_s > deadline_s + EPS


def check_system(cfg: Mapping[str, Any]) -> SystemModel | None:
    """Build the run's devices from its config (reads a trace file); refuse impossible values."""
    scfg = SystemConfig.from_mapping(cfg.get("system"))
    if scfg is None:
        return None
    return SystemModel(scfg, int(cfg["num_clients"]), int(cfg["seed"]))
