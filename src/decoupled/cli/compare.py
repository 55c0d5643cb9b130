"""Train Adam (L2) and AdamW (decoupled) — or SGD and SGDW — on a task over several seeds,
paired by seed, and report the difference with confidence intervals and a paired test.

``--seeds auto[:MAX]`` adds one seed to every optimizer per round and stops when an
always-valid confidence sequence decides (``lab/sequential.py``). Runs already in the store
(same complete configuration) are not trained again, so an interrupted compare, fixed or
sequential, continues where it stopped. Writes results.db, report.md, report.html and
plots/ into --out.
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


def seeds_argument(text: str) -> int | tuple[str, int]:
    """``--seeds``: a count, or ``auto`` / ``auto:MAX`` as ``("auto", MAX)``."""
    from decoupled.lab.sequential import DEFAULT_MAX_SEEDS, MIN_SEEDS

    if text != "auto" and not text.startswith("auto:"):
        return positive_int(text)
    maximum = text.partition(":")[2] if ":" in text else str(DEFAULT_MAX_SEEDS)
    try:
        value = int(maximum)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid maximum in {text!r} (auto:MAX, MAX a whole number of seeds)"
        ) from None
    if value < MIN_SEEDS:
        raise argparse.ArgumentTypeError(
            f"maximum {value} in {text!r} is below {MIN_SEEDS}, the seeds before the first look"
        )
    return ("auto", value)


def parse_pairs(text: str | None, optimizers: list[str]) -> list[tuple[str, str]]:
    """``--pairs adam:adamw,sgd:adam``: (first, second) pairs of compared optimizers."""
    if text is None:
        return []
    result = []
    for item in text.split(","):
        first, colon, second = (part.strip() for part in item.partition(":"))
        if not colon or not first or not second or first == second:
            raise CommandError(
                f"argument --pairs: malformed pair {item.strip()!r} in {text!r} "
                "(FIRST:SECOND, two different optimizers, e.g. adam:adamw,sgd:adam)"
            )
        for name in (first, second):
            if name not in optimizers:
                raise CommandError(
                    f"argument --pairs: {name!r} in {text!r} is not compared "
                    f"(--optimizers {','.join(optimizers)})"
                )
        result.append((first, second))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument(
        "--seeds",
        type=seeds_argument,
        default=5,
        metavar="N|auto[:MAX]",
        help="seeds per optimizer, paired across optimizers (default 5); auto: add seeds "
        "until an always-valid confidence sequence decides, at most MAX (default 20)",
    )
    parser.add_argument(
        "--resolution",
        type=positive_float,
        default=None,
        help="with --seeds auto: also stop once the interval is narrower than this, in the "
        "metric's units as printed (points for an error rate)",
    )
    parser.add_argument(
        "--pairs",
        default=None,
        metavar="A:B,...",
        help="more pairs to compare (B − A), e.g. sgd:adam; p-values are Holm-adjusted "
        "across all pairs reported",
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
            dest=f"wd_{name}",  # read back as wd_<registry name>, hyphens kept
            type=nonnegative_float,
            default=None,
            metavar="λ",
            help=f"weight decay of {name} (default: the task's)",
        )
    parser.add_argument("--warmup", type=nonnegative_int, default=0, help="warm-up steps")
    parser.add_argument(
        "--state-dtype",
        choices=["bfloat16", "int8"],
        default=None,
        help="keep Adam/AdamW's moments in bfloat16 or in blockwise int8 codes (default: the "
        "parameters' dtype)",
    )


def run(args: argparse.Namespace) -> int:
    from decoupled.lab.compare_options import Sequential
    from decoupled.lab.comparison import metric_scale
    from decoupled.lab.sequential import MIN_SEEDS
    from decoupled.lab.workflow import compare_task

    # Everything is checked before anything is written.
    task = resolve_task(args.task, args.data_dir)
    optimizers = parse_optimizers(args.optimizers)
    refuse_unused_weight_decays(args, optimizers, "compared")
    auto = isinstance(args.seeds, tuple)
    check_seeds(args.seeds[1] if auto else args.seeds)
    if args.resolution is not None and not auto:
        raise CommandError(
            f"argument --resolution: {args.resolution:g} is only used with --seeds auto"
        )
    extra_pairs = parse_pairs(args.pairs, optimizers)
    sequential = None
    if auto:
        scale = metric_scale(task.metric)[0]
        resolution = None if args.resolution is None else args.resolution / scale
        sequential = Sequential(max_seeds=args.seeds[1], resolution=resolution)
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

    seeds = f"seeds auto (at most {sequential.max_seeds})" if sequential else f"{args.seeds} seeds"
    print(
        f"decoupled compare: task {task.name} ({task.metric}), {', '.join(optimizers)}, "
        f"{seeds} x {steps} steps -> {out}"
    )
    options = dict(
        optimizers=optimizers,
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
        extra_pairs=extra_pairs,
    )
    if sequential is None:
        # the table before the reports: a disk that fills up at the plots loses no result
        comparison = compare_task(task, seeds=args.seeds, before_reports=_print_table, **options)
    else:
        # One round per seed, every optimizer in it, so that the pairs stay paired; a
        # resumed compare replays its rounds from the store without training them again.
        for count in range(MIN_SEEDS, sequential.max_seeds + 1):
            comparison = compare_task(
                task,
                seeds=count,
                sequential=sequential,
                before_reports=lambda comparison, count=count: _after_round(comparison, count),
                **options,
            )
            if _last_round(comparison):
                break
    print(f"\nreports: {out / 'report.md'}, {out / 'report.html'}")
    return report_missing("compare", comparison.missing)


def _print_table(comparison) -> None:
    from decoupled.lab.comparison import format_table

    print(f"\n{format_table(comparison)}", flush=True)


def _last_round(comparison) -> bool:
    """Every pair has decided, or runs failed (the next invocation retries them)."""
    return comparison.should_stop() or bool(comparison.missing)


def _after_round(comparison, count: int) -> None:
    print(f"after {count} seeds: {_round_summary(comparison)}", flush=True)
    if _last_round(comparison):
        _print_table(comparison)


def _round_summary(comparison) -> str:
    """One line per round of ``--seeds auto``: each pair's interval and whether it stops."""
    from decoupled.lab.comparison import format_bound, metric_scale

    scale, unit = metric_scale(comparison.task.metric)
    points = " points" if unit == "%" else ""
    parts = []
    for (first, second, _, _), pair in zip(comparison.paired, comparison.sequential, strict=True):
        if pair is None:
            parts.append(f"{second.name} − {first.name}: fewer than 2 finished seeds")
            continue
        look = pair.look
        interval = (
            "(−∞, +∞)"
            if look.width == float("inf")
            else f"[{format_bound(look.low * scale)}, {format_bound(look.high * scale)}]{points}"
        )
        parts.append(f"{second.name} − {first.name} {interval}, {pair.reason or 'going on'}")
    return "; ".join(parts)
