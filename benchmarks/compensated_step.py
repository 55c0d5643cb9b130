"""Step throughput of compensated bfloat16 weights: the C++ kernel, the reference loop, torch.

    python benchmarks/compensated_step.py [--layout gpt2-small] [--steps 3] [--rounds 3]
        [--no-reference]

bfloat16 θ and g, AdamW (lr 1e-3, λ 0.01), parameters per second of one ``step()``, measured in
alternating rounds (a busy machine slows each contender alike), with the ratio to torch's fused
AdamW on the same bfloat16 θ (which keeps no master weight: its updates below half a bfloat16
ulp are lost, README "Smallest state"). Bytes moved per parameter: compensated, θ, r, g, m, v
read and θ, r, m, v written, 2+1+2+2+2 + 2+1+2+2 = 16 (bfloat16 moments, the default for a
bfloat16 θ), 12 with int8 moments (plus the block scales); torch's fused, 14. The reference
loop's rate is taken over one step per round (on GPT-2 small it takes tens of seconds a step:
``--no-reference`` leaves it out).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import decoupled
from decoupled.bench import LAYOUTS
from decoupled.optim._cpu import cpu_summary

OPTIONS = {"lr": 1e-3, "weight_decay": 0.01}
CONTENDERS = {
    "decoupled.AdamW compensated, kernel": lambda p: decoupled.AdamW(p, **OPTIONS),
    "decoupled.AdamW compensated + int8 moments, kernel": lambda p: decoupled.AdamW(
        p, state_dtype="int8", **OPTIONS
    ),
    "decoupled.AdamW compensated, ref. loop": lambda p: decoupled.AdamW(p, fused=False, **OPTIONS),
    "torch AdamW fused (no compensation)": lambda p: torch.optim.AdamW(p, fused=True, **OPTIONS),
}
REFERENCE = "decoupled.AdamW compensated, ref. loop"


def measure(layout: str, steps: int, rounds: int, reference: bool = True) -> dict[str, float]:
    """Median parameters/second of each contender over ``rounds`` alternating rounds."""
    params = [torch.randn(s, dtype=torch.bfloat16).requires_grad_() for s in LAYOUTS[layout]()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    count = sum(p.numel() for p in params)
    chosen = {name: make for name, make in CONTENDERS.items() if reference or name != REFERENCE}
    optimizers = {name: make(params) for name, make in chosen.items()}
    for optimizer in optimizers.values():  # create the state outside the timing
        optimizer.step()
    rates: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            repeats = 1 if name == REFERENCE else steps
            start = time.perf_counter()
            for _ in range(repeats):
                optimizer.step()
            rates[name].append(count * repeats / (time.perf_counter() - start))
    del optimizers, params
    gc.collect()
    return {name: statistics.median(values) for name, values in rates.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="gpt2-small", choices=sorted(LAYOUTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="leave the reference loop out")
    args = parser.parse_args()
    rates = measure(args.layout, args.steps, args.rounds, reference=not args.no_reference)
    fused = rates["torch AdamW fused (no compensation)"]
    print(cpu_summary())
    print(f"{args.layout}, bfloat16 θ, {torch.get_num_threads()} threads")
    width = max(map(len, rates)) + 2
    print(f"{'optimizer':<{width}}{'G params/s':>11}{'vs fused':>10}")
    for name, rate in rates.items():
        print(f"{name:<{width}}{rate / 1e9:>11.3f}{rate / fused:>9.2f}x")
