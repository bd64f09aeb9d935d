"""Prompt retries for a message's objects that have not arrived yet.

In Flower 1.39 a message and its objects travel separately: the sender registers the message,
then pushes its objects one request each. A receiver polling every 50-100 ms often sees the
message before its objects are all there, and ``pull_objects`` then waits 1 s before it asks
again (``PULL_INITIAL_BACKOFF``, doubling to 10 s; no setting). A trace of
``scripts/bench_deploy.py`` showed this wait at both ends of a round: the SuperNode pulling the
server's message and the ServerApp pulling the clients' replies, about 1 s each time it hit.

:func:`prompt_object_pulls` swaps a module's ``pull_objects`` for the same function retrying
after 50 ms (doubling to 0.2 s) with no cap on tries; Flower's limit on the total wait
(``PULL_MAX_TIME``, 2 h) stays, so a large model on a slow link still has its time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from types import ModuleType

# The first retry of an object that has not arrived, and the longest wait between retries: a
# missing object is one in flight on loopback or a LAN, here in milliseconds.
OBJECT_RETRY_S = 0.05
OBJECT_RETRY_CAP_S = 0.2
_TUNED = ("initial_backoff", "backoff_cap", "max_tries_per_object")


def prompt_pull_objects():
    """Flower's ``pull_objects`` with fedvision's retry timings."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if not set(_TUNED) <= set(inspect.signature(pull_objects).parameters):
        raise RuntimeError(
            "this Flower's pull_objects no longer takes "
            f"{', '.join(_TUNED)} (fedvision/fl/pulls.py); fedvision supports Flower 1.39"
        )
    return functools.partial(
        pull_objects,
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=OBJECT_RETRY_CAP_S,
        max_tries_per_object=None,
    )


def tune(module: ModuleType) -> None:
    """Make ``module`` (a Flower module that calls ``pull_objects`` by name) retry promptly."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if getattr(module, "pull_objects", None) is not pull_objects:
        raise RuntimeError(
            f"{module.__name__} no longer calls Flower's pull_objects by name "
            "(fedvision/fl/pulls.py); fedvision supports Flower 1.39"
        )
    module.pull_objects = prompt_pull_objects()


@contextlib.contextmanager
def prompt_object_pulls(module: ModuleType) -> Iterator[None]:
    """While inside, ``module`` retries a missing object after 50 ms (see the module doc)."""
    original = module.pull_objects
    tune(module)
    try:
        yield
    finally:
        module.pull_objects = original


def object_pulls_for(grid: object) -> contextlib.AbstractContextManager[None]:
    """:func:`prompt_object_pulls` for a deployment's grid, nothing for any other grid."""
    from flwr.superlink.grid import http_grid

    if isinstance(grid, http_grid.HttpGrid):
        return prompt_object_pulls(http_grid)
    return contextlib.nullcontext()
