"""``fedvision report``: tables and a plot over run and sweep directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def report(ns: argparse.Namespace) -> int:
    """Write report.md, report.csv and the plots; print the table."""
    from fedvision.report.table import write_report

    group_by = [k.strip() for k in ns.group_by.split(",") if k.strip()] if ns.group_by else None
    text = write_report(ns.dirs, ns.out, target=ns.target, group_by=group_by, sort_by=ns.sort_by)
    print(text, end="")
    plots = sorted(p.name for p in ns.out.glob("report*.png"))
    print(f"wrote {ns.out}/report.md, report.csv, {', '.join(plots)}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` and its options."""
    rep = sub.add_parser(
        "report",
        help="tables and a plot over run and sweep directories (mean ± std over seeds)",
        description="Group the runs under DIR... by their settings (all but the seed) and write "
        "a markdown table, a CSV and a plot of test accuracy per round: per group the mean and "
        "standard deviation over seeds of the partitions' label TV (distance from IID), final "
        "test accuracy, test accuracy at the best "
        "validation round, rounds to reach --target, bytes moved and wall time. Failed or "
        "unfinished runs are listed, never averaged.",
    )
    rep.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (report)")
    rep.add_argument("--target", type=float, default=0.5, help="test accuracy to reach (0.5)")
    rep.add_argument(
        "--group-by",
        metavar="KEYS",
        help="group only by these comma-separated config keys or groups (e.g. "
        "partition.alpha,strategy); runs differing in anything else are pooled",
    )
    rep.add_argument(
        "--sort-by",
        choices=("group", "accuracy", "heterogeneity"),
        default="group",
        help="row order: group name, test accuracy at best validation (best first) or label "
        "TV, the partition's distance from IID (IID first)",
    )
    rep.set_defaults(handler=report)
