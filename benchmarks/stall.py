"""The stall test: small-lr AdamW on a quadratic, where plain bfloat16 weights stop moving.

    python benchmarks/stall.py [--steps 2000] [--lr 1e-4]

f(θ) = ½·Σ hᵢ(θᵢ − θ*ᵢ)², θ* of order 1, θ started 0.05 away. An Adam step moves θ by about
lr = 1e-4, far below half a bfloat16 ulp at |θ| ≈ 1 (2⁻⁹ ≈ 2e-3): plain bfloat16 weights
round every update (and the decay) away. Compensated bfloat16 weights (an int8 remainder,
``decoupled.optim._compensated``) keep them and follow float32 weights. Prints the distance to
the float32 run and how far each run moved, for float32, bfloat16 + compensation, and plain
bfloat16 (``compensate=False``), each also with int8 moments.
"""

from __future__ import annotations

import argparse

import torch

import decoupled


def run(dtype, steps=2000, lr=1e-4, n=4096, **options) -> torch.Tensor:
    """θ after ``steps`` of AdamW (weight decay 0.1) in ``dtype``, as float32."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(n, generator=generator) * 2 + 0.5
    curvature = torch.logspace(-1, 1, n)
    start = target + 0.05 * torch.randn(n, generator=generator)
    theta = torch.nn.Parameter(start.to(dtype))
    optimizer = decoupled.AdamW([theta], lr=lr, weight_decay=0.1, **options)
    for _ in range(steps):
        theta.grad = (curvature * (theta.detach().float() - target)).to(dtype)
        optimizer.step()
    return theta.detach().float()


def table(steps=2000, lr=1e-4, n=4096) -> str:
    start = run(torch.float32, steps=0, n=n)
    reference = run(torch.float32, steps, lr, n)
    moved = (reference - start).norm()
    lines = [
        f"AdamW lr={lr} weight_decay=0.1, {steps} steps, {n} weights; float32 moved "
        f"{moved:.4f} (norm)",
        f"{'weights':<28}{'state':<8}{'moved / float32':>16}{'distance to float32':>21}",
    ]
    for label, dtype, options in (
        ("float32", torch.float32, {}),
        ("bfloat16 + compensation", torch.bfloat16, {}),
        ("bfloat16 plain", torch.bfloat16, {"compensate": False}),
    ):
        for state in (None, "int8"):
            theta = run(dtype, steps, lr, n, state_dtype=state, **options)
            lines.append(
                f"{label:<28}{state or dtype_name(dtype):<8}{(theta - start).norm() / moved:>16.3f}"
                f"{(theta - reference).norm() / moved:>21.4f}"
            )
    return "\n".join(lines)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(table(args.steps, args.lr))
