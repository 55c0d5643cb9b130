"""Bytes per parameter of an AdamW step, θ + g + state, measured from the tensors' ``nbytes``.

    python benchmarks/memory_table.py

Every combination of the parameters' dtype (float32; bfloat16 with the default compensation,
an int8 remainder; bfloat16 plain, ``compensate=False``) and the moments' dtype (θ's dtype,
``state_dtype=torch.bfloat16``, ``state_dtype="int8"``), on one 1M-element tensor after a step:
the step counter and the int8 scales (one float32 per 256 elements) are included.
"""

from __future__ import annotations

import torch

import decoupled

N = 1 << 20


def bytes_per_param(param_dtype: torch.dtype, **options) -> dict[str, float]:
    theta = torch.nn.Parameter(torch.zeros(N, dtype=param_dtype))
    optimizer = decoupled.AdamW([theta], **options)
    theta.grad = torch.ones_like(theta)
    optimizer.step()
    state = optimizer.state[theta]
    parts = {"θ": theta.nbytes, "g": theta.grad.nbytes}
    parts["moments"] = sum(t.nbytes for k, t in state.items() if k.startswith("exp_avg"))
    parts["other state"] = sum(t.nbytes for k, t in state.items() if not k.startswith("exp_avg"))
    return {key: value / N for key, value in parts.items()}


def table() -> str:
    lines = [
        f"{'θ':<26}{'state':<10}{'θ':>6}{'g':>6}{'moments':>9}{'other':>8}{'total':>8}",
    ]
    for label, dtype, options in (
        ("float32", torch.float32, {}),
        ("bfloat16 + compensation", torch.bfloat16, {}),
        ("bfloat16 plain", torch.bfloat16, {"compensate": False}),
    ):
        for state in (None, torch.bfloat16, "int8"):
            if state is torch.bfloat16 and dtype is torch.bfloat16:
                continue  # the same as θ's dtype
            parts = bytes_per_param(dtype, state_dtype=state, **options)
            name = "int8" if state == "int8" else str(state or dtype).removeprefix("torch.")
            lines.append(
                f"{label:<26}{name:<10}{parts['θ']:>6.2f}{parts['g']:>6.2f}"
                f"{parts['moments']:>9.3f}{parts['other state']:>8.3f}{sum(parts.values()):>8.3f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
