"""Train Adam (L2) and AdamW (decoupled) — or SGD and SGDW — on a task over several seeds,
paired by seed, and report the difference with confidence intervals and a paired test.

Runs already in the store (same complete configuration) are not trained again, so an
interrupted compare continues where it stopped. Writes results.db, report.md, report.html
and plots/ into --out.
"""

from __future__ import annotations

import argparse

from decoupled.cli import (
    CommandError,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from decoupled.cli._lab_args import (
    add_run_arguments,
    check_seeds,
    output_folder,
    parse_optimizers,
    refuse_unused_weight_decays,
    report_missing,
    resolve_task,
    steps_for,
)
from decoupled.optim.registry import REGISTRY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=5,
        help="seeds per optimizer, paired across optimizers (default 5)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="learning rate for every optimizer (default: each one's tuned lr)",
    )
    for name in REGISTRY:
        parser.add_argument(
            f"--wd-{name}",
            type=nonnegative_float,
            default=None,
            metavar="λ",
            help=f"weight decay of {name} (default: the task's)",
        )
    parser.add_argument("--warmup", type=nonnegative_int, default=0, help="warm-up steps")
    parser.add_argument(
        "--state-dtype",
        choices=["bfloat16"],
        default=None,
        help="keep Adam/AdamW's moments in bfloat16 (default: the parameters' dtype)",
    )


def run(args: argparse.Namespace) -> int:
    from decoupled.lab.comparison import format_table
    from decoupled.lab.workflow import compare_task

    # Everything is checked before anything is written.
    task = resolve_task(args.task, args.data_dir)
    optimizers = parse_optimizers(args.optimizers)
    refuse_unused_weight_decays(args, optimizers, "compared")
    check_seeds(args.seeds)
    steps = steps_for(args, task)
    if args.warmup >= steps:
        raise CommandError(f"argument --warmup: {args.warmup} must be below the budget ({steps})")
    no_moments = [name for name in optimizers if not REGISTRY[name].state_dtype]
    if args.state_dtype is not None and no_moments:
        raise CommandError(
            f"argument --state-dtype: only for adam/adamw (they keep moments), not "
            f"{', '.join(no_moments)}"
        )
    overrides = {}
    for name in optimizers:
        settings = {}
        if args.lr is not None:
            settings["lr"] = args.lr
        if getattr(args, f"wd_{name}") is not None:
            settings["weight_decay"] = getattr(args, f"wd_{name}")
        overrides[name] = settings
    out = output_folder(args.out)

    print(
        f"decoupled compare: task {task.name} ({task.metric}), {', '.join(optimizers)}, "
        f"{args.seeds} seeds x {steps} steps -> {out}"
    )
    comparison = compare_task(
        task,
        optimizers=optimizers,
        seeds=args.seeds,
        steps=steps,
        out=out,
        overrides=overrides,
        workers=args.workers,
        progress=not args.no_progress,
        decay_scale=args.decay_scale,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        data_dir=args.data_dir,
        state_dtype=args.state_dtype,
        # the table before the reports: a disk that fills up at the plots loses no result
        before_reports=lambda comparison: print(f"\n{format_table(comparison)}", flush=True),
    )
    print(f"\nreports: {out / 'report.md'}, {out / 'report.html'}")
    return report_missing("compare", comparison.missing)
