"""Does compact state (bfloat16 or int8 moments, bfloat16 weights) change what a task learns?

    python benchmarks/compact_state_lab.py [--tasks mnist1d,charlm] [--seeds 5] [--quick]
        [--only TEXT]

AdamW on each task (its full budget and default hyperparameters), the same seeds for every
combination of weights and moments:

- float32 θ with float32 (the reference), bfloat16 or int8 moments;
- bfloat16 θ with compensation (an int8 remainder, ``decoupled.optim._compensated``) with
  bfloat16 or int8 moments — the smallest, 7 bytes per parameter with θ and g;
- bfloat16 θ without compensation (``compensate=False``), as torch.optim steps it.

Prints per task and combination the final metric (mean ± seed-to-seed spread), the bytes per
parameter (θ + g + state), and the paired difference to the reference (by seed) with its 95%
interval and p-value; an interval covering 0 means no detectable difference at this many
seeds. bfloat16 weights run the model in bfloat16 (inputs cast on the way in, outputs cast to
float32 for the loss), as a model cast with ``model.bfloat16()`` does. The lab's RunSpec does
not describe weight dtypes or int8 moments, so this script wraps the task and the optimizer
around ``decoupled.lab.train.run``; runs are not stored.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import decoupled
from decoupled.lab import train
from decoupled.lab.plan import plan_compare
from decoupled.lab.stats import paired_difference
from decoupled.lab.tasks import get_task

COMBINATIONS = {  # name: (weights' dtype, AdamW options)
    "f32 θ, f32 state": (torch.float32, {}),
    "f32 θ, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "f32 θ, int8 state": (torch.float32, {"state_dtype": "int8"}),
    "bf16 θ+comp, bf16 state": (torch.bfloat16, {}),
    "bf16 θ+comp, int8 state": (torch.bfloat16, {"state_dtype": "int8"}),
    "bf16 θ plain, bf16 state": (torch.bfloat16, {"compensate": False}),
}


def _cast_floats(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class LowPrecisionTask:
    """``task`` whose model holds ``dtype`` weights: float inputs are cast to ``dtype`` and
    float outputs back to float32, so that losses and metrics are computed as before."""

    def __init__(self, task, dtype: torch.dtype):
        self.task, self.dtype = task, dtype

    def __getattr__(self, name):
        return getattr(self.task, name)

    def build_model(self):
        model = self.task.build_model().to(self.dtype)
        model.register_forward_pre_hook(lambda _, args: _cast_floats(args, self.dtype))
        model.register_forward_hook(lambda _, __, out: _cast_floats(out, torch.float32))
        return model


def bytes_per_param(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    params = [p for p in model.parameters()]
    count = sum(p.numel() for p in params)
    total = sum(2 * p.nbytes for p in params)  # θ and g
    for p in params:
        total += sum(t.nbytes for k, t in optimizer.state[p].items() if k != "step")
    return total / count


def run_one(task, data, name: str, seed: int, steps: int) -> tuple[float, float]:
    dtype, options = COMBINATIONS[name]
    spec = plan_compare(task, ["adamw"], seed + 1, steps)[seed]  # the task's AdamW defaults
    built = {}

    def build_optimizer(spec, model):
        groups = decoupled.param_groups(model, spec.weight_decay, verbose=False)
        built["model"], built["optimizer"] = (
            model,
            decoupled.AdamW(groups, lr=spec.lr, decay_scale=spec.decay_scale, **options),
        )
        return built["optimizer"]

    original, train.build_optimizer = train.build_optimizer, build_optimizer
    try:
        wrapped = task if dtype == torch.float32 else LowPrecisionTask(task, dtype)
        result = train.run(spec, task=wrapped, data=data, device="cpu")
    finally:
        train.build_optimizer = original
    return result.metric, bytes_per_param(built["model"], built["optimizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d,charlm")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tasks' smoke-test budgets")
    parser.add_argument(
        "--only", default="", help="only the combinations whose name contains this (e.g. int8), "
        "besides the float32 reference"
    )  # fmt: skip
    args = parser.parse_args()
    chosen = [name for name in COMBINATIONS if args.only in name or name == "f32 θ, f32 state"]
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        data = task.load(None)
        steps = task.quick_steps if args.quick else task.steps
        started = time.perf_counter()
        metrics, sizes = {}, {}
        for name in chosen:
            runs = [run_one(task, data, name, seed, steps) for seed in range(args.seeds)]
            metrics[name] = np.array([metric for metric, _ in runs])
            sizes[name] = runs[0][1]
        print(f"\n{task.name}: AdamW, final {task.metric}, {args.seeds} seeds x {steps} steps "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        print(f"{'weights, moments':<26}{'bytes/param':>12}{'final metric':>20}"
              f"{'vs f32 state (95% CI)':>36}")  # fmt: skip
        reference = metrics["f32 θ, f32 state"]
        for name, values in metrics.items():
            line = (f"{name:<26}{sizes[name]:>12.2f}{values.mean():>11.4g} ± "
                    f"{values.std(ddof=1):<7.2g}")  # fmt: skip
            if name != "f32 θ, f32 state":
                diff = paired_difference(reference, values)
                line += (f"{diff.mean_diff:>+12.4g} [{diff.low:+.3g}, {diff.high:+.3g}] "
                         f"p={diff.p_value:.2f}")  # fmt: skip
            print(line, flush=True)
    print("\n(± is the seed-to-seed standard deviation; a paired interval covering 0 means no "
          "detectable difference at this many seeds)")  # fmt: skip


if __name__ == "__main__":
    main()
