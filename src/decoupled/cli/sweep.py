"""Sweep learning rate × weight decay for each optimizer (the paper's Figure 2) and report
heatmaps and how separable each landscape is.

Ranges are lo:hi:n (n distinct log-spaced values, both ends included; lo = hi needs n = 1) or
comma lists (which may hold 0), e.g. --lr 1e-4:1e-2:7 --wd-adamw 0,1e-3:1 is invalid but
--wd-adamw 0,1e-3,1e-2 works. --space FILE takes a JSON search space instead: {"lr": {"min":
1e-4, "max": 1e-2, "num": 7, "scaling": "log"}, "wd_adamw": {"values": [0, 0.01, 0.1]}} (keys
lr, weight_decay, wd_<optimizer>; num an integer >= 1). A --wd-<name> option or wd_<name> key
for an optimizer not in --optimizers is refused, and so is a grid of more than 10,000 cells
(lr x λ, summed over optimizers) unless --max-cells raises the bound. Every cell is a run in
the store: a sweep that is stopped (Ctrl-C or kill -9) and started again runs only what is
missing.
"""

from __future__ import annotations

import argparse

from decoupled.cli import CommandError, positive_int
from decoupled.cli._lab_args import (
    add_run_arguments,
    check_executor,
    check_seeds,
    output_folder,
    parse_optimizers,
    refuse_unused_weight_decays,
    report_missing,
    resolve_task,
    steps_for,
)
from decoupled.optim.registry import NAMES as OPTIMIZERS

EXECUTORS = ("local", "batched", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument(
        "--lr",
        default=None,
        help="lr grid for every optimizer (default: the tuned lr ×1/10..×10, 5 values)",
    )
    for name in OPTIMIZERS:
        parser.add_argument(
            f"--wd-{name}",
            dest=f"wd_{name}",  # read back as wd_<registry name>, hyphens kept
            default=None,
            metavar="RANGE",
            help=f"λ grid of {name} (default: the tuned λ ×1/30..×30, 5 values)",
        )
    parser.add_argument(
        "--space", default=None, metavar="FILE", help="JSON search space (overrides --lr/--wd-*)"
    )
    parser.add_argument("--seeds", type=positive_int, default=1, help="seeds per cell (default 1)")
    parser.add_argument(
        "--max-cells",
        type=positive_int,
        default=None,
        metavar="N",
        help="refuse grids of more than N cells, lr x λ summed over optimizers (default 10000)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local processes (default); batched: the cells of each seed in one vmapped model "
        "(for GPUs; slower than local on a CPU); ray: a Ray cluster (pip install 'decoupled[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster address: auto, ray://host:port (default: start a local Ray instance)",
    )
    parser.add_argument(
        "--ray-max-retries",
        type=int,
        default=None,
        metavar="N",
        help="times Ray reruns a run whose worker process or node died (default 3; 0: none)",
    )


def _grids(args, task, optimizers):
    from decoupled.lab.grid import (
        MAX_CELLS,
        RangeError,
        check_grid_size,
        default_lrs,
        default_wds,
        parse_range,
        space_from_json,
    )

    try:
        space = space_from_json(args.space) if args.space else {}
    except RangeError as error:
        raise CommandError(str(error)) from None
    refuse_unused_weight_decays(args, optimizers, "swept")
    check_seeds(args.seeds)
    swept = ", ".join(optimizers)
    for name in OPTIMIZERS:
        if name not in optimizers and f"wd_{name}" in space:
            raise CommandError(
                f"search space {args.space}: key 'wd_{name}': {name} is not being swept "
                f"(--optimizers {swept})"
            )
    try:
        lrs, wds = {}, {}
        for name in optimizers:
            if "lr" in space:
                lrs[name] = space["lr"]
            elif args.lr is not None:
                lrs[name] = parse_range(args.lr, "argument --lr")
            else:
                lrs[name] = default_lrs(task, name)
            text = getattr(args, f"wd_{name}")
            if f"wd_{name}" in space:
                wds[name] = space[f"wd_{name}"]
            elif "weight_decay" in space:
                wds[name] = space["weight_decay"]
            elif text is not None:
                wds[name] = parse_range(text, f"argument --wd-{name}")
            else:
                wds[name] = default_wds(task, name)
            if any(v <= 0 for v in lrs[name]):
                raise RangeError("argument --lr: learning rates must be > 0")
        check_grid_size(lrs, wds, args.max_cells or MAX_CELLS)
    except RangeError as error:
        raise CommandError(str(error)) from None
    return lrs, wds


def run(args: argparse.Namespace) -> int:
    from decoupled.lab.sweep import format_landscapes
    from decoupled.lab.workflow import sweep_task

    optimizers = parse_optimizers(args.optimizers)
    task = resolve_task(args.task, args.data_dir)
    lrs, wds = _grids(args, task, optimizers)
    check_executor(args.executor, args.ray_address, args.ray_max_retries)
    steps = steps_for(args, task)
    out = output_folder(args.out)

    cells = sum(len(lrs[n]) * len(wds[n]) for n in optimizers)
    print(
        f"decoupled sweep: task {task.name}, {', '.join(optimizers)}: {cells} cells x "
        f"{args.seeds} seeds x {steps} steps, executor {args.executor} -> {out}"
    )
    from decoupled.lab.ray_executor import RayUnavailable

    try:
        grid, missing = sweep_task(
            task,
            optimizers=optimizers,
            lrs=lrs,
            wds=wds,
            seeds=args.seeds,
            steps=steps,
            out=out,
            executor=args.executor,
            workers=args.workers,
            progress=not args.no_progress,
            ray_address=args.ray_address,
            ray_max_retries=args.ray_max_retries,
            # the table before the reports: a disk that fills up at the plots loses no result
            before_reports=lambda summary: print(
                f"\n{format_landscapes(summary[0], task.metric)}", flush=True
            ),
            decay_scale=args.decay_scale,
            schedule=args.schedule,
            data_dir=args.data_dir,
        )
    except RayUnavailable as error:
        raise CommandError(f"argument --ray-address: {error}") from None
    print(f"\nreports: {out / 'report.md'}, {out / 'report.html'}")
    return report_missing("sweep", missing)
