"""Sweep throughput: the batched executor against the same cells run one after another.

    python benchmarks/sweep_batched.py [--cells 25] [--steps 100] [--optimizer adamw]

Model-steps per second on the default task (mnist1d), for K cells (lr × λ) of one seed:
sequential runs with the runner (torch.optim-style, one model at a time) and one batched run
(torch.func.vmap over stacked parameters). Prints the ratio; the issue's target is 3x.
"""

import argparse
import time

import torch

from decoupled.lab.batched import run_batched
from decoupled.lab.tasks import get_task
from decoupled.lab.train import RunSpec, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=25)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("mnist1d")
    data = task.load()
    side = max(1, round(args.cells**0.5))
    specs = [
        RunSpec(
            "mnist1d",
            args.optimizer,
            lr=1e-3 * 2**i,
            weight_decay=0.01 * 3**j,
            seed=0,
            steps=args.steps,
            eval_every=args.steps,
        )
        for i in range(side)
        for j in range(side)
    ]
    start = time.perf_counter()
    for spec in specs:
        run(spec, task=task, data=data)
    sequential = len(specs) * args.steps / (time.perf_counter() - start)
    start = time.perf_counter()
    run_batched(specs, task, data)
    batched = len(specs) * args.steps / (time.perf_counter() - start)
    print(f"mnist1d, {len(specs)} cells x {args.steps} steps, {args.threads} threads")
    print(f"sequential runs : {sequential:8.1f} model-steps/s")
    print(f"batched (vmap)  : {batched:8.1f} model-steps/s  ({batched / sequential:.2f}x)")
