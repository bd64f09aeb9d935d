"""A client's state between rounds (SCAFFOLD's ``c_i``, FedBN's BatchNorm), kept so that a
resumed run continues it.

A client's state lives in one of two places:

- **files in the run directory** (``client-state/<partition>/<key>.<round>.npz``) when every
  client sees that directory, as in the simulation (on one machine, or a Ray cluster with a
  shared filesystem) and in cohort execution, where any worker may train any client next. The
  server keeps the files in step with its checkpoints: after round r's checkpoint each of the
  round's clients keeps only its newest file, and a resume from round r first drops every file
  of a later round (the round the stop cut short). A resumed run therefore trains each client
  from the state that round r left it, as the uninterrupted run does;
- **the node's Flower Context** otherwise (a SuperNode on its own machine cannot see the run
  directory). A resumed run is a new Flower run with new Contexts: the state starts afresh.

Both stores answer ``get(key)`` and ``store[key] = record`` with Flower ArrayRecords, so the
ClientApps call one interface. A train message reads the newest state of an earlier round and
writes its own round's; an evaluate message of round r reads the newest up to round r.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from fedvision import constants as C
from fedvision.atomic import write_with
from fedvision.errors import FedvisionError

_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_-]+)\.(?P<round>\d+)\.npz$")


class StateStore(Protocol):
    """Where a client's state records live between rounds (see the module docstring)."""

    def get(self, key: str) -> ArrayRecord | None: ...

    def __setitem__(self, key: str, record: ArrayRecord) -> None: ...


def _files(folder: Path) -> list[tuple[str, int, Path]]:
    """``(key, round, path)`` of every state file in one client's folder (none: [])."""
    if not folder.is_dir():
        return []
    out = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m:
            out.append((m["key"], int(m["round"]), path))
    return out


class FileState:
    """One client's state in the run directory's ``client-state`` folder.

    ``reads_before``: records of rounds before this one are visible (a train message of round r
    passes r, an evaluate message r + 1); ``writes_round``: the round a stored record belongs to.
    """

    def __init__(self, folder: Path, pid: int, reads_before: int, writes_round: int) -> None:
        self.folder = Path(folder) / str(int(pid))
        self.reads_before, self.writes_round = int(reads_before), int(writes_round)

    def get(self, key: str) -> ArrayRecord | None:
        """The newest record of ``key`` from a visible round, or None (the client never had one)."""
        found = [(r, p) for k, r, p in _files(self.folder) if k == key and r < self.reads_before]
        if not found:
            return None
        path = max(found)[1]
        try:
            with np.load(path, allow_pickle=False) as data:
                return ArrayRecord({name: Array(np.array(data[name])) for name in data.files})
        except (OSError, ValueError) as exc:  # a file cut short outside fedvision's writes
            raise FedvisionError(
                f"client state {path} does not read ({exc}); remove it to start that client's "
                "state afresh"
            ) from exc

    def __setitem__(self, key: str, record: ArrayRecord) -> None:
        """Keep ``record`` as this client's ``key`` of round ``writes_round`` (atomic, fsynced)."""
        if not _NAME.match(f"{key}.0.npz"):
            raise ValueError(f"state key {key!r} is not a plain name")
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {name: a.numpy() for name, a in record.items()}
        path = self.folder / f"{key}.{self.writes_round}.npz"
        write_with(path, lambda f: np.savez(f, **arrays))


def client_state(
    record: Mapping[str, Any], context: Context, pid: int, *, evaluating: bool = False
) -> StateStore:
    """Where this message's client keeps its state: the round config's folder, else the Context."""
    folder = record.get(C.KEY_CLIENT_STATE)
    if not folder:
        return context.state
    rnd = int(record[C.KEY_SERVER_ROUND])
    return FileState(Path(str(folder)), pid, rnd + 1 if evaluating else rnd, rnd)


class ClientStates:
    """The server's side of the ``client-state`` folder: keeps it in step with the checkpoints."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def start(self, resumed_round: int | None) -> None:
        """Before the first round: a new run starts with no state; a resumed one keeps what its
        checkpoint's round left (files of later rounds, and unfinished writes, are dropped)."""
        if resumed_round is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        if not self.folder.is_dir():
            return
        for client in self.folder.iterdir():
            if not client.is_dir():
                continue
            for path in client.iterdir():
                m = _NAME.match(path.name)
                if m is None or int(m["round"]) > resumed_round:
                    path.unlink()

    def keep_newest(self, pids: Iterable[int]) -> None:
        """After a checkpoint: each of these clients keeps only its newest record of each key."""
        for pid in pids:
            newest: dict[str, tuple[int, Path]] = {}
            stale = []
            for key, rnd, path in _files(self.folder / str(int(pid))):
                if key in newest and newest[key][0] > rnd:
                    stale.append(path)
                    continue
                if key in newest:
                    stale.append(newest[key][1])
                newest[key] = (rnd, path)
            for path in stale:
                path.unlink(missing_ok=True)
