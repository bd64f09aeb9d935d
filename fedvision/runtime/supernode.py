"""``python -m fedvision.runtime.supernode``: Flower 1.39's SuperNode with three timings set.

Flower 1.39 fixes three timings of a SuperNode in code, with no flag or setting:

* it asks the SuperLink for a message, and when there is none sleeps 3 s (and 0.5 s between
  checks for a finished reply): a message that arrives just after a poll waits up to 3 s, twice
  per round (train, evaluate). Measured on loopback this is most of a round's overhead.
* it tells the SuperLink to expect a heartbeat every 30 s; the SuperLink marks a node offline
  (and fails its messages) after two missed ones, so a dead client blocks a round for a minute.
* a message's objects that have not reached the SuperLink yet are asked for again after 1 s,
  doubling (:mod:`fedvision.fl.pulls`): it retries after 50 ms.

This launcher sets the first two (``--poll-interval``, ``--heartbeat-interval``; Flower accepts
10 s to 30 min for the latter) and the third, and then runs Flower's own ``flower-supernode``
entry point with the remaining arguments. It patches names inside three Flower modules only, in
this process only; the module-level bindings it replaces are checked so that a Flower upgrade
that moves them fails here, loudly, instead of silently going back to the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

from fedvision.fl import pulls


def _capped_time(poll_s: float) -> SimpleNamespace:
    """``time`` as the SuperNode loop sees it: every sleep at most ``poll_s`` seconds."""

    def sleep(seconds: float) -> None:
        time.sleep(min(float(seconds), poll_s))

    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    return SimpleNamespace(**{**names, "sleep": sleep})


def apply_timings(poll_s: float, heartbeat_s: float) -> None:
    """Set the SuperNode's idle poll and heartbeat interval in the loaded Flower modules."""
    import flwr.client.grpc_rere_client.connection as connection
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.start_client_internal as internal

    # The interval the node announces (connection) and the one its sender keeps (heartbeat):
    # set only the first, and the SuperLink drops a node that keeps Flower's 30 s pace.
    if getattr(internal, "time", None) is not time or not all(
        hasattr(m, "HEARTBEAT_DEFAULT_INTERVAL") for m in (connection, heartbeat)
    ):
        raise RuntimeError(
            "this Flower no longer has the SuperNode timings fedvision sets "
            "(fedvision/runtime/supernode.py); it supports Flower 1.39"
        )
    internal.time = _capped_time(poll_s)
    pulls.tune(internal)  # a message's objects: retried after 50 ms, not 1 s
    connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s


def main(argv: list[str] | None = None) -> None:
    """Parse the two timings, hand everything else to ``flower-supernode``."""
    parser = argparse.ArgumentParser(prog="fedvision-supernode", add_help=False)
    parser.add_argument("--poll-interval", type=float, default=3.0)
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    ours, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    apply_timings(ours.poll_interval, ours.heartbeat_interval)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
