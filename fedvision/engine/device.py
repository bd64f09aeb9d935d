"""Choosing the torch device."""

from __future__ import annotations

import torch

from fedvision.errors import FedvisionError


def resolve_device(pref: str = "auto") -> torch.device:
    """Return the device for a preference string.

    Parameters
    ----------
    pref
        ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device
    """
    pref = str(pref).strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FedvisionError(
                f"device {pref!r} was asked for but CUDA is not available here; use device=cpu "
                "or device=auto"
            )
        dev = torch.device(pref)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FedvisionError(
                f"device {pref!r} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
        return dev
    raise FedvisionError(f"unknown device {pref!r}; use auto, cpu, cuda or cuda:N")
