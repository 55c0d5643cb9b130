"""Checks shared by the training commands (compare, sweep, inspect): all run before anything
is written, and each failure becomes one `CommandError` line naming the argument."""

from __future__ import annotations

import argparse
from pathlib import Path

from decoupled.cli import CommandError


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid int: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def resolve_task(name: str, data_dir: str | None = None):
    """The task object; a task that needs files (cifar10) is loaded once to check them."""
    from decoupled.lab.tasks import get_task

    try:
        task = get_task(name)
    except ValueError as error:
        raise CommandError(f"argument --task: {error}") from None
    if task.needs_data_dir:
        try:
            task.load(data_dir)
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"argument --data-dir: {error}") from None
    return task


def parse_optimizers(text: str) -> list[str]:
    """Distinct optimizer names from a comma-separated list."""
    from decoupled.lab.train import OPTIMIZERS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names or len(set(names)) != len(names):
        problem = f"unknown {unknown}" if unknown else "empty or repeated names"
        raise CommandError(
            f"argument --optimizers: {problem} in {text!r} "
            f"(choose distinct names from {', '.join(OPTIMIZERS)})"
        )
    return names


def output_folder(path: str) -> Path:
    from decoupled.lab.workflow import prepare_out_dir

    try:
        return prepare_out_dir(path)
    except OSError as error:
        raise CommandError(f"argument --out: {error}") from None
