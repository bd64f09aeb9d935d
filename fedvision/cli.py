"""The ``fedvision`` command: ``run`` and ``pretrain`` (Hydra), ``report``, ``data`` commands.

Orchestration only: each module of ``fedvision.commands`` registers its subcommands and their
handlers; this module lists those modules and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from fedvision import __version__
from fedvision.commands import compress, data, deploy, pretrain, report, run
from fedvision.errors import FedvisionError

# In the order `fedvision --help` lists them; a module adds its commands in its register(sub).
COMMANDS: tuple[ModuleType, ...] = (run, pretrain, report, compress, deploy, data)


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser and its subcommands action, every command module registered."""
    p = argparse.ArgumentParser(
        prog="fedvision",
        description="Federated fine-tuning of pretrained CNNs on ImageNet-style data (Flower).",
    )
    p.add_argument("--version", action="version", version=f"fedvision {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return p, sub


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedvision`` command."""
    return _parser()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedvision`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, sub = _parser()
    command = sub.choices.get(argv[0]) if argv else None
    # run and pretrain hand their whole command line to Hydra (its own --help, -m, --cfg).
    hydra_command: Callable[[Sequence[str]], int] | None = (
        command.get_default("hydra_handler") if command is not None else None
    )
    ns = None if hydra_command else parser.parse_args(argv)
    try:
        if hydra_command is not None:
            return hydra_command(argv[1:])  # Hydra owns the rest of the command line
        return int(ns.handler(ns))
    except FedvisionError as exc:
        print(f"fedvision: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
