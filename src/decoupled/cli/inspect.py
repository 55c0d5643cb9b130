"""Look inside weight decay: what Adam + L2 and AdamW actually do, per element and per layer.

`decoupled inspect` (or `inspect train`) trains Adam + L2, AdamW and AdamW + CWD (cautious
weight decay, arXiv 2510.12402) on a task with its default hyperparameters, the same seed and
the same batches, with a DecayMonitor attached; it prints the Adam vs AdamW table (with an
AdamW + CWD column) filled with measured numbers and writes plots (decay distributions,
angular updates against theory, weight norms, decay over time, decay vs gradient size) and
the monitor's rows (results.db, table decay_monitor) into --out.

`decoupled inspect fixed-points` trains Adam + L2, SGD + L2 and AdamW to convergence on a
convex problem (full-batch logistic regression) and checks where each ends against exact
solvers: the L2-regularized optimum, or the ℓ∞-constrained one for AdamW (Xie & Li 2024).
"""

from __future__ import annotations

import argparse
import sys

from decoupled.cli import CommandError, nonnegative_int, positive_float, positive_int
from decoupled.cli._lab_args import output_folder, resolve_task

DEFAULT_STEPS = 3000
DEFAULT_SEED = 0
DEFAULT_OUT = "./decoupled-runs/inspect"
INSPECTED = ("adam", "adamw", "adamw-cautious")  # the table's columns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from decoupled.lab.tasks import DEFAULT_TASK, task_names

    parser.add_argument(
        "what",
        nargs="?",
        choices=("train", "fixed-points"),
        default="train",
        help="train: monitor Adam + L2 vs AdamW on --task (default); "
        "fixed-points: where they converge on a convex problem",
    )
    parser.add_argument(
        "--task",
        default=None,
        help=f"train: one of {', '.join(task_names())} (default: {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"optimizer steps per run (train default: the task's budget, at most {DEFAULT_STEPS}: "
        "about 20 s for mnist1d on 2 idle cores; fixed-points default: 20000)",
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help=f"train: seed of both runs (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=None,
        help="train: record the monitor every this many steps (default: steps/100)",
    )
    parser.add_argument(
        "--weight-decay",
        type=positive_float,
        default=None,
        help="fixed-points: λ of all three optimizers (default 1)",
    )
    parser.add_argument("--data-dir", default=None, help="train: data folder (cifar10)")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"output folder for plots and results.db (default {DEFAULT_OUT})",
    )


def run(args: argparse.Namespace) -> int:
    if args.what == "fixed-points":
        return run_fixed_points(args)
    return run_train(args)


def run_train(args: argparse.Namespace) -> int:
    from decoupled.lab.tasks import DEFAULT_TASK

    # None, not the defaults, in the parser: so that fixed-points can tell them given
    task = resolve_task(args.task if args.task is not None else DEFAULT_TASK, args.data_dir)
    seed = args.seed if args.seed is not None else DEFAULT_SEED
    missing = [name for name in INSPECTED if name not in task.defaults]
    if missing:
        raise CommandError(f"argument --task: {task.name} has no defaults for {missing}")
    if args.weight_decay is not None:
        raise CommandError("argument --weight-decay: only for `inspect fixed-points`")
    steps = args.steps or min(DEFAULT_STEPS, task.steps)
    every = args.every or max(1, steps // 100)
    if every > steps:
        raise CommandError(f"argument --every: {every} is more than --steps ({steps})")
    try:
        data = task.load(args.data_dir)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"argument --data-dir: {error}") from None
    out = output_folder(args.out)
    from decoupled.diagnostics.inspection import format_comparison
    from decoupled.diagnostics.plots import plot_inspection
    from decoupled.lab.inspection import inspect_task

    print(
        f"decoupled inspect: task {task.name}, Adam + L2 vs AdamW vs AdamW + CWD (task defaults), "
        f"{steps} steps, seed {seed}, monitor every {every} steps -> {out}"
    )
    try:
        runs = inspect_task(task, data, steps=steps, seed=seed, every=every, optimizers=INSPECTED)
    except FloatingPointError as error:  # a diverged run: a result, reported in one line
        print(f"decoupled inspect: {error}", file=sys.stderr)
        return 1
    from decoupled.lab.executor import open_store

    for run in runs:
        open_store(out / "results.db").save_decay_table(
            f"inspect-{task.name}-{run.spec.optimizer}", run.table
        )
        print(f"  {run.label}: {len(run.table)} monitor rows, {run.wall_time:.1f} s")
    print()
    print(format_comparison(runs))
    paths = plot_inspection(runs, out)
    print(f"\nplots: {', '.join(str(p) for p in paths)}")
    print(f"monitor rows: {out / 'results.db'} (table decay_monitor)")
    return 0


def run_fixed_points(args: argparse.Namespace) -> int:
    from decoupled.diagnostics.fixed_points import (
        STEPS,
        WEIGHT_DECAY,
        check_weight_decay,
        fixed_points,
        format_fixed_points,
    )

    for name in ("task", "seed", "every", "data_dir"):
        if getattr(args, name) is not None:
            raise CommandError(f"argument --{name.replace('_', '-')}: only for `inspect train`")
    weight_decay, steps = args.weight_decay or WEIGHT_DECAY, args.steps or STEPS
    try:
        check_weight_decay(weight_decay, steps)
    except ValueError as error:
        raise CommandError(f"argument --weight-decay: {error}") from None
    out = output_folder(args.out)
    from decoupled.diagnostics.fixed_points_plot import plot_fixed_points

    result = fixed_points(weight_decay, steps)
    print(format_fixed_points(result))
    path = plot_fixed_points(result, out / "fixed_points.png")
    print(f"\nplot: {path}")
    return 0
