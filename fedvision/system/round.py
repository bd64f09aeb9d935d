"""The round loop's hook into simulated system heterogeneity (:mod:`fedvision.system.model`).

Two calls per round: :meth:`SystemRound.plan` after the strategy made the train messages (drop
the clients that drop out, give each the local-step cap it gets), :meth:`SystemRound.settle`
after the replies (leave out late updates, advance the simulated clock, return the metrics).
Under ``system=none`` there is no ``SystemRound`` at all and the loop runs as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedvision import constants as C
from fedvision.atomic import write_json_atomic
from fedvision.errors import FedvisionError
from fedvision.fl.feature import Feature
from fedvision.system.model import ClientPlan, SystemModel, check_system


def _bytes(msg: Message) -> int:
    return sum(a.count_bytes() for a in msg.content.array_records.values())


class SystemRound(Feature):
    """Owns a run's simulated devices, the round's plans and the simulated clock."""

    def __init__(self, model: SystemModel, sim_time_s: float = 0.0) -> None:
        self.model = model
        self.sim_time_s = float(sim_time_s)
        self.plans: list[ClientPlan] = []

    @classmethod
    def build(
        cls, cfg: Mapping[str, Any], run_dir: Path, history: Sequence[Mapping[str, Any]]
    ) -> SystemRound | None:
        """The hook for a run (None under ``system=none``); writes the devices to ``system.json``.

        A resumed run's clock continues from its last recorded ``sim_time_s``.
        """
        model = check_system(cfg)
        if model is None:
            return None
        write_json_atomic(
            run_dir / C.RUN_SYSTEM,
            {
                "seed": model.seed,
                "clients": [
                    {"partition": p, "speed": d.speed, "down_bps": d.down_bps, "up_bps": d.up_bps}
                    for p, d in enumerate(model.profiles)
                ],
            },
        )
        done = [float(r["sim_time_s"]) for r in history if r.get("sim_time_s") is not None]
        return cls(model, done[-1] if done else 0.0)

    def plan(
        self, server_round: int, messages: Sequence[Message], partition_of: Mapping[int, int]
    ) -> list[Message]:
        """The messages to send: without dropouts, each with its own step cap where it has one.

        Flower's strategies send every node the same RecordDict; a client whose config changes
        gets its own copy of the content (the arrays are shared, not copied).
        """
        self.plans, out = [], []
        for m in messages:
            config = m.content[C.KEY_CONFIG]
            cap = int(config[C.KEY_LOCAL_STEPS])
            pid = partition_of[m.metadata.dst_node_id]
            batch = int(config[C.KEY_BATCH_SIZE])
            plan = self.model.plan(server_round, pid, _bytes(m), batch, None if cap < 0 else cap)
            self.plans.append(plan)
            if not plan.send:
                continue
            if plan.steps is not None and (plan.steps != cap or plan.steps_only):
                own = ConfigRecord(dict(config))
                own[C.KEY_LOCAL_STEPS] = int(plan.steps)
                if plan.steps_only:
                    own[C.KEY_LOCAL_EPOCHS] = 0  # the step count alone sets the work
                m.content = RecordDict({**dict(m.content.items()), C.KEY_CONFIG: own})
            out.append(m)
        return out

    def settle(
        self, ok: Sequence[Message], partition_of: Mapping[int, int]
    ) -> tuple[list[Message], dict[str, Any]]:
        """The replies that count (late ones left out) and the round's simulated-time metrics."""
        work, by_pid = {}, {}
        for m in ok:
            pid = partition_of[m.metadata.src_node_id]
            metrics = m.content[C.KEY_METRICS]
            if C.KEY_TRAIN_SAMPLES not in metrics:
                raise FedvisionError(
                    f"partition {pid}'s reply lacks {C.KEY_TRAIN_SAMPLES!r}, which the simulated "
                    "clock needs: the client runs an older fedvision; update it or use system=none"
                )
            steps, samples = int(metrics[C.KEY_STEPS]), int(metrics[C.KEY_TRAIN_SAMPLES])
            work[pid] = (steps, samples, _bytes(m))
            by_pid[pid] = m
        outcome = self.model.outcome(self.plans, work)
        self.sim_time_s += outcome.sim_round_s
        record: dict[str, Any] = {
            "sim_round_s": round(outcome.sim_round_s, 6),
            "sim_time_s": round(self.sim_time_s, 6),
            "num_dropped": len(outcome.dropped),
            "sim_clients": [
                {
                    "partition": r.partition,
                    "steps": r.steps,
                    "samples": r.samples,
                    "sim_s": round(r.sim_s, 6),
                }
                for r in outcome.clients
            ],
        }
        if outcome.dropped:
            record["dropped"] = [
                {**d, "sim_s": round(d["sim_s"], 6)} if "sim_s" in d else d for d in outcome.dropped
            ]
        return [by_pid[p] for p in outcome.accepted], record
