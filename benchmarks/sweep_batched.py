"""Sweep throughput: the batched executor against the same cells run one after another.

    python benchmarks/sweep_batched.py [--cells 25] [--steps 100] [--optimizer adamw]

Model-steps per second on the default task (mnist1d), for K cells (lr × λ) of one seed:
sequential runs with the runner (torch.optim-style, one model at a time) and one batched run
(torch.func.vmap over stacked parameters). Prints the ratio; the issue's target is 3x.

It also prints the ceiling any batching can reach on this machine: the FLOPs of one
model-step (convolutions and matmuls, forward and backward, counted by torch's
FlopCounterMode) divided by the sequential step time give the GFLOP/s the sequential runs
already achieve; a large float32 matmul gives the CPU's peak at this thread count. Batching
cannot beat peak / sequential, and a model of 32-channel convolutions with BatchNorm gets
well below peak.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from decoupled.lab.batched import run_batched
from decoupled.lab.tasks import get_task
from decoupled.lab.train import RunSpec, run


def flops_per_model_step(task, data) -> float:
    model = task.build_model()
    batch = next(task.batches(data, torch.Generator().manual_seed(0)))
    with FlopCounterMode(display=False) as counter:
        task.loss(model, batch).backward()
    return counter.get_total_flops()


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


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
            threads=args.threads,
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
    flops, peak = flops_per_model_step(task, data), matmul_peak()
    achieved = flops * sequential
    print(
        f"ceiling: {flops / 1e6:.1f} MFLOP per model-step; sequential runs reach "
        f"{achieved / 1e9:.0f} GFLOP/s, a 2048x2048 float32 matmul {peak / 1e9:.0f} GFLOP/s "
        f"-> no batching beats {peak / achieved:.1f}x here"
    )
