"""Rebuild report.md and report.html (and their plots) from the results store in --out,
without training anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from decoupled.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="./decoupled-runs",
        help="the output folder holding results.db (default ./decoupled-runs)",
    )


def run(args: argparse.Namespace) -> int:
    from decoupled.lab.store import StoreError
    from decoupled.lab.workflow import rebuild_reports

    try:
        paths = rebuild_reports(Path(args.out))
    except (OSError, StoreError) as error:  # missing, a folder, damaged, unreadable
        raise CommandError(f"argument --out: {error}") from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
