"""The stall test: small-lr AdamW and SGDW on a quadratic, where plain bfloat16 weights stop.

    python benchmarks/stall.py [--steps 2000] [--lr 1e-4] [--sgd-lr 1e-3]

f(θ) = ½·Σ hᵢ(θᵢ − θ*ᵢ)², θ* of order 1, θ started 0.05 away. An Adam step moves θ by about
lr = 1e-4, far below half a bfloat16 ulp at |θ| ≈ 1 (2⁻⁹ ≈ 2e-3): plain bfloat16 weights
round every update (and the decay) away. Compensated bfloat16 weights (an int8 remainder,
``decoupled.optim._compensated``) keep them and follow float32 weights. Prints the distance to
the float32 run and how far each run moved, for float32, bfloat16 + compensation, and plain
bfloat16 (``compensate=False``): AdamW each also with int8 moments, then SGDW (momentum 0.9,
lr 1e-3: a step of lr·b ≈ lr·hᵢ·|θ − θ*|/(1 − 0.9) ≤ 5e-3·hᵢ·|θ − θ*|, below half an ulp for
most weights once they are a few hundredths from θ*).
"""

from __future__ import annotations

import argparse

import torch

import decoupled


def run(dtype, steps=2000, lr=1e-4, n=4096, algorithm="adamw", **options) -> torch.Tensor:
    """θ after ``steps`` of AdamW or SGDW (``algorithm``; weight decay 0.1) in ``dtype``, as
    float32; ``options`` go to the optimizer (``momentum`` for SGDW)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(n, generator=generator) * 2 + 0.5
    curvature = torch.logspace(-1, 1, n)
    start = target + 0.05 * torch.randn(n, generator=generator)
    theta = torch.nn.Parameter(start.to(dtype))
    cls = {"adamw": decoupled.AdamW, "sgdw": decoupled.SGDW}[algorithm]
    optimizer = cls([theta], lr=lr, weight_decay=0.1, **options)
    for _ in range(steps):
        theta.grad = (curvature * (theta.detach().float() - target)).to(dtype)
        optimizer.step()
    return theta.detach().float()


WEIGHTS = (
    ("float32", torch.float32, {}),
    ("bfloat16 + compensation", torch.bfloat16, {}),
    ("bfloat16 plain", torch.bfloat16, {"compensate": False}),
)


def table(steps=2000, lr=1e-4, n=4096, sgd_lr=1e-3) -> str:
    lines = []
    for algorithm, step_lr, states, extra in (
        ("adamw", lr, (None, "int8"), {}),
        ("sgdw", sgd_lr, (None,), {"momentum": 0.9}),
    ):
        start = run(torch.float32, 0, step_lr, n, algorithm, **extra)
        reference = run(torch.float32, steps, step_lr, n, algorithm, **extra)
        moved = (reference - start).norm()
        name = {"adamw": "AdamW", "sgdw": "SGDW momentum=0.9"}[algorithm]
        lines += [
            f"{name} lr={step_lr} weight_decay=0.1, {steps} steps, {n} weights; float32 moved "
            f"{moved:.4f} (norm)",
            f"{'weights':<28}{'state':<8}{'moved / float32':>16}{'distance to float32':>21}",
        ]
        for label, dtype, options in WEIGHTS:
            for state in states:
                stated = {"state_dtype": state} if algorithm == "adamw" else {}
                theta = run(dtype, steps, step_lr, n, algorithm, **stated, **extra, **options)
                kept = state or dtype_name(buffer_dtype(algorithm, dtype, options))
                lines.append(
                    f"{label:<28}{kept:<8}{(theta - start).norm() / moved:>16.3f}"
                    f"{(theta - reference).norm() / moved:>21.4f}"
                )
        lines.append("")
    return "\n".join(lines).rstrip()


def buffer_dtype(algorithm: str, dtype: torch.dtype, options: dict) -> torch.dtype:
    """The state's dtype: θ's, except SGDW's float32 momentum buffer for compensated θ."""
    compensated = dtype != torch.float32 and options.get("compensate") is not False
    return torch.float32 if algorithm == "sgdw" and compensated else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW's lr")
    parser.add_argument("--sgd-lr", type=float, default=1e-3, help="SGDW's lr")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(table(args.steps, args.lr, sgd_lr=args.sgd_lr))
