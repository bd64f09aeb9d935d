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
