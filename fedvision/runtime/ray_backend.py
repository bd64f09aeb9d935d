"""Flower's Ray backend for the simulation, made to survive the loss of a Ray node.

Flower 1.39's ``RayBackend`` runs every client message on an actor of a fixed pool (one actor
per ``client_resources`` share of the cluster, counted once at the start). When an actor dies
(its node was lost, or its process was killed) Flower puts it back into the pool: every later
message handed to it fails at once, and as such a failure is quick the dead actor is taken
again and again: in the setting of tests/test_raycluster.py (4 clients, two worker nodes, one
killed in round 2) Flower's backend failed 2 clients in round 2 and 3 of 4 in round 3, and it
goes on so for the rest of the run. :class:`NodeLossTolerantRayBackend` leaves a
dead actor out of the pool instead and lets a message wait for a live one: the message that
was running on the lost node fails (the round loop records it and goes on), and later rounds
train every client on the nodes that are left. The simulation engine creates its backend by
name, so :func:`tolerant_backend` puts this class in Flower's place while a simulation runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend

log = logging.getLogger(__name__)


class NodeLossTolerantRayBackend(raybackend.RayBackend):
    """``RayBackend`` whose pool drops actors that died instead of handing them out again."""

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Build Flower's pool, plus the condition that messages wait on for a free actor."""
        super().build(app_fn)
        self._free = threading.Condition()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` on a live actor; a dead actor leaves the pool.

        Raises what the actor raised (Flower turns it into an error reply); a ``RuntimeError``
        once no actor is left at all.
        """
        pool, app_fn = self.pool, self.app_fn
        if pool is None or app_fn is None:
            raise ValueError("call build() before process_message()")
        with self._free:
            while not pool.pool:
                if pool.num_actors <= 0:
                    raise RuntimeError(
                        "no Ray actor is left to run clients: the nodes of all of them were "
                        "lost; restart the run on a cluster with resources (resume=...)"
                    )
                self._free.wait()  # an actor coming back, or dying, notifies
            actor = pool.pool.pop()
        alive = True
        try:
            future = actor.run.remote(
                app_fn, message, str(context.node_config[PARTITION_ID_KEY]), context
            )
            _, out_message, updated_context = ray.get(future)
            return out_message, updated_context
        except ray.exceptions.ActorDiedError:
            alive = False  # a dead actor is not restarted (max_restarts=0)
            log.warning("a Ray actor of the simulation died; %d left", pool.num_actors - 1)
            raise
        finally:
            with self._free:
                if alive:
                    pool.pool.append(actor)
                else:
                    pool.num_actors -= 1
                self._free.notify_all()


@contextlib.contextmanager
def tolerant_backend() -> Iterator[None]:
    """While inside, Flower's simulation engine builds :class:`NodeLossTolerantRayBackend`.

    The engine imports ``RayBackend`` from its module when it starts its backend (there is no
    other way to choose one in 1.39); the name is put back on the way out.
    """
    original: Any = raybackend.RayBackend
    raybackend.RayBackend = NodeLossTolerantRayBackend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
