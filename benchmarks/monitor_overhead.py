"""How much a DecayMonitor (every=10) slows down training on the default task.

Trains the default task (mnist1d: its model, batch size and defaults), with AdamW and then
with Adam + L2, in short blocks of steps, alternating blocks without and with the monitor
attached, so that both see the same machine load. Prints the time per step of each (the
fastest block, which is the least disturbed by other processes, and the median) and three
estimates of the overhead ratio: fastest over fastest, the median of the ratios of
neighbouring blocks, and 1 + the time spent inside the monitor's hooks over the time of a
plain step. Target: at most 1.10. Nothing is asserted: CPU timings on a shared machine are
noisy.

    python benchmarks/monitor_overhead.py [--optimizers adamw,adam] [--blocks 20] [--every 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decoupled.diagnostics import DecayMonitor
from decoupled.lab.tasks import DEFAULT_TASK, get_task
from decoupled.lab.train import RunSpec, build_optimizer


class TimedMonitor(DecayMonitor):
    """A DecayMonitor that adds up the seconds spent in its own hooks."""

    hook_seconds = 0.0

    def _before_step(self, *args) -> None:
        started = time.perf_counter()
        super()._before_step(*args)
        TimedMonitor.hook_seconds += time.perf_counter() - started

    def _after_step(self, *args) -> None:
        started = time.perf_counter()
        super()._after_step(*args)
        TimedMonitor.hook_seconds += time.perf_counter() - started


def time_block(task, model, optimizer, batches, steps: int) -> float:
    """Seconds per training step over ``steps`` steps."""
    started = time.perf_counter()
    for _ in range(steps):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def measure(task, data, optimizer_name: str, args) -> None:
    """Alternate plain and monitored blocks for one optimizer; print the overhead estimates."""
    hyper = task.defaults[optimizer_name]
    spec = RunSpec(task.name, optimizer_name, hyper.lr, hyper.weight_decay, seed=0, steps=1)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = build_optimizer(spec, model)
    batches = task.batches(data, torch.Generator().manual_seed(0))
    time_block(task, model, optimizer, batches, 20)  # warm-up: allocator, Adam state

    TimedMonitor.hook_seconds = 0.0
    plain, monitored = [], []
    for _ in range(args.blocks):
        plain.append(time_block(task, model, optimizer, batches, args.steps_per_block))
        with TimedMonitor(optimizer, model, every=args.every):
            monitored.append(time_block(task, model, optimizer, batches, args.steps_per_block))
    median_plain = statistics.median(plain)
    # the monitor's own time over the plain steps' time: less sensitive to other processes
    in_hooks = TimedMonitor.hook_seconds / (args.blocks * args.steps_per_block)
    estimates = (
        ("fastest / fastest", min(monitored) / min(plain)),
        ("median of paired ratios", statistics.median(m / p for p, m in zip(plain, monitored))),
        ("1 + hooks / plain step", 1 + in_hooks / median_plain),
    )
    print(f"\n{optimizer_name} ({'decoupled decay' if optimizer_name == 'adamw' else 'L2'})")
    print(f"{'':24}{'fastest block':>15}{'median block':>15}")
    print(f"{'without monitor':24}{min(plain) * 1e3:>12.2f} ms{median_plain * 1e3:>12.2f} ms")
    print(
        f"{f'with monitor every {args.every}':24}{min(monitored) * 1e3:>12.2f} ms"
        f"{statistics.median(monitored) * 1e3:>12.2f} ms   (per step)"
    )
    print(f"{'time in monitor hooks':24}{in_hooks * 1e3:>12.3f} ms per step on average")
    for name, ratio in estimates:
        verdict = "within" if ratio <= 1.10 else "ABOVE"
        print(f"overhead, {name:<24}{ratio:6.3f}  ({verdict} the 1.10 target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument(
        "--optimizers", default="adamw,adam", help="comma-separated, from adamw, adam"
    )
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each kind")
    parser.add_argument("--steps-per-block", type=int, default=50)
    parser.add_argument("--every", type=int, default=10, help="the monitor's interval")
    args = parser.parse_args()

    task = get_task(args.task)
    data = task.load()
    print(
        f"task {task.name} (batch {task.batch_size}, its default hyperparameters), "
        f"{args.blocks} x {args.steps_per_block} steps each way, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name in args.optimizers.split(","):
        measure(task, data, name.strip(), args)


if __name__ == "__main__":
    main()
