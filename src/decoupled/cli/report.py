"""Rebuild report.md and report.html (and their plots) from the results store in --out,
without training anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from decoupled.cli import CommandError, storage_failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="./decoupled-runs",
        help="the output folder holding results.db (default ./decoupled-runs)",
    )


def run(args: argparse.Namespace) -> int:
    from decoupled.lab.executor import open_store
    from decoupled.lab.experiments import load_experiments
    from decoupled.lab.store import StoreError
    from decoupled.lab.workflow import DB_NAME, rebuild_reports

    if not args.out.strip():
        raise CommandError("argument --out: empty (give the folder holding results.db)")
    out = Path(args.out)
    try:
        db_path = out / DB_NAME
        if db_path.exists() or db_path.is_symlink():
            # first: it refuses a results.db that is no usable store, and writes nothing then
            store = open_store(db_path, create=False)
        if db_path.exists() and not load_experiments(store):
            raise CommandError(
                f"argument --out: {db_path} holds no compare or sweep experiment: "
                "nothing to report (an inspect folder's monitor rows are read by inspect)"
            )
        paths = rebuild_reports(out)
    except (OSError, StoreError) as error:  # missing, a folder, damaged, unreadable
        if storage_failure(error):  # the disk, not the argument: exit status 3
            raise
        raise CommandError(f"argument --out: {error}") from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
