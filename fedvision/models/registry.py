"""Architectures torchvision lacks, built by name exactly like torchvision's own.

Each entry is a builder ``f(num_classes) -> nn.Module`` plus the facts the factory and the
config checks need. Add an architecture by writing its module and one entry in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from fedvision.models.simple_cnn import SIMPLE_CNN_INPUT_SIZE, SimpleCNN


@dataclass(frozen=True)
class Architecture:
    """A non-torchvision architecture.

    Attributes
    ----------
    build
        ``build(num_classes)`` returns the model, randomly initialised, with a
        ``num_classes`` head.
    input_size
        The one image side length it accepts, or ``None`` when any size works.
    reference
        Where it comes from (paper and code), for ``list`` output and docs.
    """

    build: Callable[[int], nn.Module]
    input_size: int | None
    reference: str


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        "simple_cnn": Architecture(
            build=SimpleCNN,
            input_size=SIMPLE_CNN_INPUT_SIZE,
            reference=(
                "NIID-Bench simple-cnn: Li et al., Federated Learning on Non-IID Data Silos: "
                "An Experimental Study, ICDE 2022"
            ),
        ),
    }
)


def fixed_input_size(name: str) -> int | None:
    """Return the only image size architecture ``name`` accepts, ``None`` if any size works.

    Every torchvision classifier takes any size at least about 32 px, so only entries of
    :data:`ARCHITECTURES` can return a number.
    """
    arch = ARCHITECTURES.get(name)
    return arch.input_size if arch is not None else None
