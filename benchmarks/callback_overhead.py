"""What logging the decay diagnostics to TensorBoard costs, at the integrations' default
interval (every 50 steps; ``--every 10`` for a busier one), against a plain training step of
the lab's default task (mnist1d).

Alternates blocks of steps without and with a ``TensorBoardDecayLogger`` (monitor, scalars and
the ``SummaryWriter``: what the Hugging Face and Lightning callbacks also do per recorded
step), so that both see the same machine load, and prints the time per step, the overhead
ratio and the CPU. Three estimates of the ratio: the median of neighbouring blocks' ratios,
fastest over fastest, and 1 + the least time per step spent inside the logger's hooks (over
the blocks) over the fastest plain step: the least sensitive to other processes on a shared
machine.
Target: at most 1.05. Nothing is asserted: CPU timings on a shared machine are noisy.

    python benchmarks/callback_overhead.py [--optimizer adamw] [--blocks 10] [--every 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monitor_overhead import time_block  # this folder is on sys.path when run as a script
from torch.utils.tensorboard import SummaryWriter

from decoupled.integrations import TensorBoardDecayLogger
from decoupled.integrations.scalars import DEFAULT_EVERY_N_STEPS
from decoupled.lab.tasks import DEFAULT_TASK, get_task
from decoupled.lab.train import RunSpec, build_optimizer


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class HookTimer:
    """Adds up the seconds the hooks registered between :meth:`open` and :meth:`close`
    take: its own hooks go first and last in torch's hook order (registration order)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def _start(self, *args) -> None:
        self._started = time.perf_counter()

    def _stop(self, *args) -> None:
        self.seconds += time.perf_counter() - self._started

    def open(self, optimizer) -> list:
        return [
            optimizer.register_step_pre_hook(self._start),
            optimizer.register_step_post_hook(self._start),
        ]

    def close(self, optimizer) -> list:
        return [
            optimizer.register_step_pre_hook(self._stop),
            optimizer.register_step_post_hook(self._stop),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw", help="adamw or adam")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of each kind")
    parser.add_argument("--steps-per-block", type=int, default=100)
    parser.add_argument(
        "--every", type=int, default=DEFAULT_EVERY_N_STEPS, help="the logging interval"
    )
    args = parser.parse_args()

    task = get_task(DEFAULT_TASK)
    hyper = task.defaults[args.optimizer]
    spec = RunSpec(task.name, args.optimizer, hyper.lr, hyper.weight_decay, seed=0, steps=1)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = build_optimizer(spec, model)
    batches = task.batches(task.load(), torch.Generator().manual_seed(0))
    time_block(task, model, optimizer, batches, 20)  # warm-up: allocator, Adam state

    plain, logged, in_hooks = [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        for _ in range(args.blocks):
            plain.append(time_block(task, model, optimizer, batches, args.steps_per_block))
            timer = HookTimer()
            handles = timer.open(optimizer)
            with TensorBoardDecayLogger(optimizer, model, writer, every_n_steps=args.every):
                handles += timer.close(optimizer)
                logged.append(time_block(task, model, optimizer, batches, args.steps_per_block))
            in_hooks.append(timer.seconds / args.steps_per_block)
            for handle in handles:
                handle.remove()
        writer.close()
    paired = statistics.median(m / p for p, m in zip(plain, logged))
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    print(
        f"task {task.name} (batch {task.batch_size}), {spec.optimizer}, "
        f"{args.blocks} x {args.steps_per_block} steps each way, logging every {args.every}"
    )
    print(f"plain step        {statistics.median(plain) * 1e3:8.3f} ms (median block)")
    print(f"with TensorBoard  {statistics.median(logged) * 1e3:8.3f} ms (median block)")
    print(f"in the logger's hooks {min(in_hooks) * 1e3:8.3f} ms per step (least block)")
    estimates = (
        ("median of paired ratios", paired),
        ("fastest / fastest", min(logged) / min(plain)),
        ("1 + least hooks / fastest", 1 + min(in_hooks) / min(plain)),
    )
    for name, ratio in estimates:
        verdict = "within" if ratio <= 1.05 else "ABOVE"
        print(f"overhead, {name:<24}{ratio:6.3f}  ({verdict} the 1.05 target)")


if __name__ == "__main__":
    main()
