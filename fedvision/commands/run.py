"""``fedvision run``: a federated experiment, its command line handed to Hydra."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

RUN_HELP = """\
Federated fine-tuning in a Flower simulation on Ray. Takes Hydra overrides (key=value,
group=option); `fedvision run --help` lists the config groups and keys.
Examples: fedvision run num_rounds=20 strategy=fedprox strategy.proximal_mu=0.01
          fedvision run -m partition.alpha=0.1,0.5,1.0        (a sweep)
          fedvision run resume=outputs/2026-11-27/10-00-00   (continue a run)"""


def hydra_args(args: list[str], check: Callable[[str], Path]) -> list[str]:
    """A resume runs in its own directory, checked before Hydra creates anything."""
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not resume:
        return args
    # Hydra creates its output folder first, and a resume must neither create a wrong path nor
    # overwrite the original run's .hydra/ record.
    check(resume[-1])
    args = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*args, f"hydra.run.dir={resume[-1]}", "hydra.output_subdir=null"]


def run(argv: Sequence[str]) -> int:
    """Hand the overrides to the Hydra task (Hydra parses --help, -m, --cfg itself)."""
    from fedvision.runner import check_resume_dir, hydra_main

    sys.argv = ["fedvision run", *hydra_args(list(argv), check_resume_dir)]
    hydra_main()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``; its parser only documents it: Hydra reads the rest of the command line."""
    p = sub.add_parser(
        "run", help="run a federated experiment (Hydra overrides)", description=RUN_HELP
    )
    p.set_defaults(hydra_handler=run)
