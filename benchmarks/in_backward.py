"""Training-step time and gradient memory with ``step_in_backward`` against backward() + step().

    python benchmarks/in_backward.py [--layers 12] [--width 1024] [--steps 10] [--rounds 3]

A stack of ``--layers`` Linear(width, width) + tanh layers in bfloat16, AdamW with int8 moments
(compensated bfloat16 weights: 5 bytes per parameter + the live gradients), one forward and backward
pass of a batch of 64 per step. Each way is timed over ``--steps`` steps after two warm-up steps,
alternating the two ways for ``--rounds`` rounds; the best round of each is reported. The gradient
bytes alive at once are counted by a hook that runs before each step.
"""

from __future__ import annotations

import argparse
import time

import torch

import decoupled
from decoupled.optim._cpu import cpu_summary


def build(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks).bfloat16()


def peak_gradient_bytes(params: list[torch.Tensor]) -> list[int]:
    peak = [0]

    def count(_):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    return peak


def seconds_per_step(model, optimizer, in_backward: bool, steps: int, width: int) -> float:
    x = torch.randn(64, width, dtype=torch.bfloat16)

    def one_step():
        model(x).float().square().mean().backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad()

    for _ in range(2):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(cpu_summary())
    print(f"{torch.get_num_threads()} threads; {args.layers} x Linear({args.width}, "
          f"{args.width}) + tanh, bfloat16, batch 64; AdamW state_dtype='int8'")  # fmt: skip
    ways = {}
    for in_backward in (False, True):
        model = build(args.layers, args.width)
        params = list(model.parameters())
        optimizer = decoupled.AdamW(params, lr=1e-4, state_dtype="int8")
        peak = peak_gradient_bytes(params)
        if in_backward:
            decoupled.optim.step_in_backward(optimizer)
        ways[in_backward] = (model, optimizer, peak, sum(p.numel() for p in params))
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for in_backward, (model, optimizer, _, _) in ways.items():
            seconds = seconds_per_step(model, optimizer, in_backward, args.steps, args.width)
            best[in_backward] = min(best[in_backward], seconds)
    print(f"{'':<26}{'s per step':>11}{'vs step()':>11}{'gradient bytes alive':>22}")
    for in_backward, (_, _, peak, numel) in ways.items():
        name = "step_in_backward" if in_backward else "backward() + step()"
        print(f"{name:<26}{best[in_backward]:>11.4f}{best[in_backward] / best[False]:>10.2f}x"
              f"{peak[0] / numel:>15.3f} / param")  # fmt: skip


if __name__ == "__main__":
    main()
