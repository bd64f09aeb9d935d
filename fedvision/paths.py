"""Where fedvision keeps generated datasets and decoded caches."""

from __future__ import annotations

import os
from pathlib import Path


def fedvision_home() -> Path:
    """Return ``$FEDVISION_HOME`` (default ``~/.cache/fedvision``); not created here."""
    env = os.environ.get("FEDVISION_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedvision"


def builtin_dataset_dir() -> Path:
    """Return the folder of the built-in generated dataset (an ImageNet-style tree)."""
    return fedvision_home() / "datasets" / "builtin"


def cache_root() -> Path:
    """Return the folder under which decoded caches live, one sub-folder per source and size."""
    return fedvision_home() / "cache"


def shared_data_dir() -> Path:
    """Return the folder of the real datasets and weights kept beside the project (not in it).

    ``$FEDVISION_SHARED_DATA`` when set, else ``../shared/data`` next to the repository, where
    the project's machines and CI keep Imagenette, CIFAR-10 and the ImageNet weights. A user's
    clone has no such folder: configs that name it fail with a clear "no such folder" line, and
    tests that need it skip.
    """
    env = os.environ.get("FEDVISION_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"
