"""Sweep throughput on one machine: the Ray executor against the local executor, and what the
Ray driver's writing costs per result.

    python benchmarks/sweep_ray.py [--task mnist1d] [--steps 300] [--grid 5] [--workers N]

The grid is the sweep's default one (``decoupled sweep`` without --lr/--wd-*: adam and adamw,
``grid`` lrs × ``grid`` λs each, 50 cells at 5), one seed, ``steps`` steps per cell (default:
the task's --quick budget, since the full budget of 50 cells takes many minutes on 2 cores).
Both executors run the same specs (one torch thread each) into stores of their own, with one
run per core at a time: the local executor's process pool, and a local Ray instance with as
many CPUs. Ray's start-up is timed apart from the sweep.

The driver's cost per result is the time of its ``record`` call (``outcome.record``: one
``finish`` transaction and its WAL checkpoint) for every result of the Ray sweep; a result
every few seconds leaves the driver idle nearly all the time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from decoupled.lab import ray_driver
from decoupled.lab.executor import execute
from decoupled.lab.grid import default_lrs, default_wds
from decoupled.lab.plan import plan_sweep
from decoupled.lab.ray_executor import execute_on_ray
from decoupled.lab.tasks import get_task


def timed_records(durations: list[float]):
    """``outcome.record`` as the driver calls it, timing each call into ``durations``."""
    record = ray_driver.record

    def timed(store, outcome):
        start = time.perf_counter()
        status = record(store, outcome)
        durations.append(time.perf_counter() - start)
        return status

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's --quick")
    parser.add_argument("--grid", type=int, default=5, help="lrs and λs per optimizer")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import ray

    task = get_task(args.task)
    steps = args.steps or task.quick_steps
    optimizers = ["adam", "adamw"]
    lrs = {name: default_lrs(task, name, args.grid) for name in optimizers}
    wds = {name: default_wds(task, name, args.grid) for name in optimizers}
    specs = plan_sweep(task, optimizers, lrs, wds, seeds=1, steps=steps, threads=1)
    print(f"{len(specs)} cells of {task.name}, {steps} steps each, {args.workers} at a time")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        execute(specs, Path(folder, "local.db"), workers=args.workers, progress=False)
        local = time.perf_counter() - start

        start = time.perf_counter()
        env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
        ray.init(
            num_cpus=args.workers, include_dashboard=False, log_to_driver=False, runtime_env=env
        )
        started = time.perf_counter() - start
        durations: list[float] = []
        ray_driver.record = timed_records(durations)
        start = time.perf_counter()
        counts = execute_on_ray(specs, Path(folder, "ray.db"), progress=False)
        on_ray = time.perf_counter() - start
        ray.shutdown()

    assert counts["done"] + counts["diverged"] == len(specs), counts
    print(f"local executor: {len(specs) / local * 60:7.1f} cells/min ({local:.1f} s)")
    print(
        f"ray executor:   {len(specs) / on_ray * 60:7.1f} cells/min ({on_ray:.1f} s, "
        f"after {started:.1f} s to start Ray)"
    )
    print(f"ray / local:    {local / on_ray:.2f}x")
    milliseconds = sorted(d * 1e3 for d in durations)
    print(
        f"driver's record per result: median {statistics.median(milliseconds):.2f} ms, "
        f"max {milliseconds[-1]:.2f} ms over {len(milliseconds)} results "
        f"({sum(durations) / on_ray:.2%} of the Ray sweep's time)"
    )


if __name__ == "__main__":
    main()
