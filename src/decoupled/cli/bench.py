"""Measure optimizer step throughput against torch.optim's AdamW (foreach and fused) on the
parameter layouts of GPT-2 small, ResNet-50 and 1000 tensors of 20k elements, with the
memory-bandwidth floor: decoupled.AdamW's default path (the one-pass kernel), its bfloat16
state and its reference loop. Uses CUDA when present."""

from __future__ import annotations

import argparse

from decoupled.cli import CommandError, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from decoupled.bench import DEFAULT_LAYOUTS, LAYOUTS

    parser.add_argument(
        "--layouts",
        default=",".join(DEFAULT_LAYOUTS),
        help=f"comma-separated, from {', '.join(LAYOUTS)} (default: {', '.join(DEFAULT_LAYOUTS)})",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--steps", type=positive_int, default=5, help="steps per timing")
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="alternating rounds (the median is reported)"
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="the Triton path against torch (bench_device.py; the default with --device cuda); "
        "with --device cpu: tiny layouts under the Triton interpreter, a check that it runs",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from decoupled.bench import LAYOUTS
    from decoupled.bench import run as measure

    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise CommandError(
            f"argument --layouts: {f'unknown {unknown}' if unknown else 'empty'} "
            f"(choose from {', '.join(LAYOUTS)})"
        )
    if args.device not in (None, "cpu") and not (
        args.device.startswith("cuda") and torch.cuda.is_available()
    ):
        raise CommandError(f"argument --device: {args.device!r} is not available here")
    if args.triton or (args.device or "").startswith("cuda"):
        return _run_device(args, layouts)
    print(measure(layouts, args.device, args.steps, args.rounds))
    return 0


def _run_device(args: argparse.Namespace, layouts: list[str]) -> int:
    import os

    from decoupled.optim._triton import triton_available

    if not triton_available():
        raise CommandError(
            "argument --triton: triton is not installed (pip install 'decoupled[triton]')"
        )
    tiny = (args.device or "cpu") == "cpu"
    if tiny:  # read when the kernels are first decorated: before bench_device steps
        os.environ["TRITON_INTERPRET"] = "1"
    from decoupled.bench_device import run as measure_device

    print(measure_device(layouts, args.device or "cpu", args.steps, args.rounds, tiny=tiny))
    return 0
