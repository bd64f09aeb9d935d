"""``fedvision pretrain``: centralised pretraining, its command line handed to Hydra."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedvision.commands.run import hydra_args

PRETRAIN_HELP = """\
Centralised pretraining of a torchvision CNN (default: the built-in source classes). Takes Hydra
overrides; `fedvision pretrain --help` lists the keys. Its checkpoint_best.pt is what
`fedvision run model.weights=PATH` fine-tunes (the head is replaced for the target classes).
Examples: fedvision pretrain recipe.epochs=20 recipe.optimizer=adamw recipe.lr=2e-3
          fedvision pretrain data.root=/data/imagenet data.first_n=100 data.size=128
          fedvision pretrain resume=outputs/pretrain/2026-11-28/10-00-00"""


def pretrain(argv: Sequence[str]) -> int:
    """Hand the overrides to the Hydra pretraining task."""
    from fedvision.pretrain import check_pretrain_resume, hydra_pretrain

    sys.argv = ["fedvision pretrain", *hydra_args(list(argv), check_pretrain_resume)]
    hydra_pretrain()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain``; like ``run``, Hydra reads the rest of its command line."""
    p = sub.add_parser(
        "pretrain",
        help="centralised pretraining, e.g. on the built-in source classes (Hydra overrides)",
        description=PRETRAIN_HELP,
    )
    p.set_defaults(hydra_handler=pretrain)
