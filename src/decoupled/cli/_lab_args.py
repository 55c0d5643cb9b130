"""Checks shared by the training commands (compare, sweep, inspect): all run before anything
is written, and each failure becomes one `CommandError` line naming the argument."""

from __future__ import annotations

import argparse
from pathlib import Path

from decoupled.cli import CommandError


def resolve_task(name: str, data_dir: str | None = None):
    """The task object; a task that needs files (cifar10) is loaded once to check them, and a
    --data-dir for a task that reads none (it makes or bundles its data) is refused rather
    than ignored."""
    from decoupled.lab.tasks import get_task

    try:
        task = get_task(name)
    except ValueError as error:
        raise CommandError(f"argument --task: {error}") from None
    if data_dir is not None and not task.needs_data_dir:
        raise CommandError(
            f"argument --data-dir: task {task.name} reads no data folder, so {data_dir!r} "
            "would be ignored (it is for tasks with data files, e.g. cifar10)"
        )
    if task.needs_data_dir:
        try:
            task.load(data_dir)
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"argument --data-dir: {error}") from None
    return task


def parse_optimizers(text: str) -> list[str]:
    """Distinct optimizer names from a comma-separated list."""
    from decoupled.optim.registry import NAMES as OPTIMIZERS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names or len(set(names)) != len(names):
        problem = f"unknown {unknown}" if unknown else "empty or repeated names"
        raise CommandError(
            f"argument --optimizers: {problem} in {text!r} "
            f"(choose distinct names from {', '.join(OPTIMIZERS)})"
        )
    return names


#: More seeds than this is a typo (each seed is a run per optimizer), refused before planning.
MAX_SEEDS = 1000


def check_seeds(seeds: int) -> None:
    if seeds > MAX_SEEDS:
        raise CommandError(
            f"argument --seeds: {seeds} is more than {MAX_SEEDS} (a run per seed and optimizer)"
        )


def check_executor(
    executor: str, ray_address: str | None, ray_max_retries: int | None = None
) -> None:
    """--ray-address and --ray-max-retries are read by the ray executor only (a whole number
    of retries, at least 0); with it, Ray must be installed and the address usable (well
    formed, answering), all checked before anything is written."""
    if ray_max_retries is not None and ray_max_retries < 0:
        raise CommandError(
            f"argument --ray-max-retries: {ray_max_retries} is negative (0 means no retry)"
        )
    if executor != "ray":
        for option, value in (
            ("--ray-address", ray_address),
            ("--ray-max-retries", ray_max_retries),
        ):
            if value is not None:
                raise CommandError(
                    f"argument {option}: {value!r} would be ignored: only the ray executor "
                    f"reads it (--executor {executor})"
                )
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CommandError(
            "argument --executor: ray is not installed (pip install 'decoupled[ray]')"
        ) from None
    from decoupled.lab.ray_executor import RayUnavailable, check_address

    try:
        check_address(ray_address)
    except RayUnavailable as error:
        raise CommandError(f"argument --ray-address: {error}") from None


def refuse_unused_weight_decays(args: argparse.Namespace, optimizers: list[str], doing: str):
    """A ``--wd-<name>`` for an optimizer that is not run would be dropped without a word."""
    from decoupled.optim.registry import NAMES as OPTIMIZERS

    for name in OPTIMIZERS:
        if name not in optimizers and getattr(args, f"wd_{name}") is not None:
            raise CommandError(
                f"argument --wd-{name}: {name} is not being {doing} "
                f"(--optimizers {', '.join(optimizers)})"
            )


def output_folder(path: str) -> Path:
    """The output folder, created if needed, with a usable results store in it: a
    ``results.db`` that is not one (another program's database, a damaged file, a folder) is
    refused now, before any training, and left untouched."""
    from decoupled.lab.executor import open_store
    from decoupled.lab.store import StoreError
    from decoupled.lab.workflow import DB_NAME, prepare_out_dir

    if not path.strip():
        raise CommandError("argument --out: empty (give a folder; '.' for this one)")
    try:
        out = prepare_out_dir(path)
        open_store(out / DB_NAME)  # kept open for the command's runs, as they all are
    except (StoreError, OSError) as error:
        raise CommandError(f"argument --out: {error}") from None
    return out


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command shares: what to train, how long, where to write."""
    from decoupled.cli import positive_int
    from decoupled.lab.tasks import DEFAULT_TASK, task_names
    from decoupled.lab.train import SCHEDULES
    from decoupled.optim.decay import DECAY_SCALES
    from decoupled.optim.registry import NAMES as OPTIMIZERS

    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"one of {', '.join(task_names())} (default: {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--optimizers",
        default="adam,adamw",
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default adam,adamw)",
    )
    parser.add_argument(
        "--budget",
        type=positive_int,
        default=None,
        help="optimizer steps per run (default: the task's budget)",
    )
    parser.add_argument("--quick", action="store_true", help="the task's smoke-test budget")
    parser.add_argument(
        "--decay-scale",
        choices=DECAY_SCALES,
        default="lr",
        help="convention of AdamW/SGDW's decay (default lr, as torch)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="lr schedule (default cosine decay to 0)",
    )
    parser.add_argument("--data-dir", default=None, help="data folder (cifar10)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="parallel processes for local runs (default: one per core)",
    )
    parser.add_argument(
        "--out",
        default="./decoupled-runs",
        help="output folder: results.db and reports (default ./decoupled-runs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def steps_for(args: argparse.Namespace, task) -> int:
    """--budget, else the task's smoke-test budget with --quick, else its full budget."""
    return args.budget or (task.quick_steps if args.quick else task.steps)


def report_missing(command: str, missing: dict[str, str]) -> int:
    """Print a line for each kind of planned run left out of the report (stderr); the exit
    status is 1 when runs failed, else 0."""
    import sys

    for line in missing.values():
        print(f"decoupled {command}: warning: {line}", file=sys.stderr)
    return 1 if "failed" in missing else 0
