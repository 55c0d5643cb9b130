"""Bytes per parameter of an AdamW and an SGDW step, θ + g + state, from the tensors' ``nbytes``.

    python benchmarks/memory_table.py

Every combination of the parameters' dtype (float32; bfloat16 with the default compensation,
an int8 remainder; bfloat16 plain, ``compensate=False``) and, for AdamW, the moments' dtype
(θ's dtype, ``state_dtype=torch.bfloat16``, ``state_dtype="int8"``), on one 1M-element tensor
after a step: the step counter and the int8 scales (one float32 per 256 elements) are
included. SGDW (momentum 0.9) keeps one momentum buffer: θ's dtype, float32 for compensated θ.

A second table steps inside backward (``decoupled.optim.step_in_backward``), where each
gradient is freed as soon as its parameter has stepped: g is then the most gradient bytes
alive at once during one backward pass (counted by a hook that runs before each step), per
parameter, on a stack of 16 ``Linear(256, 256)`` layers (1.05M parameters). With a model's
largest tensor holding a share s of its parameters, g is about s·(bytes of one gradient).
"""

from __future__ import annotations

import torch

import decoupled

N = 1 << 20
HEADER = f"{'':<7}{'θ':<26}{'state':<10}{'θ':>6}{'g':>6}{'moments':>9}{'other':>8}{'total':>8}"


def bytes_per_param(param_dtype: torch.dtype, cls=decoupled.AdamW, **options) -> dict[str, float]:
    theta = torch.nn.Parameter(torch.zeros(N, dtype=param_dtype))
    optimizer = cls([theta], **options)
    theta.grad = torch.ones_like(theta)
    optimizer.step()
    parts = {"θ": theta.nbytes, "g": theta.grad.nbytes} | state_bytes([optimizer.state[theta]])
    return {key: value / N for key, value in parts.items()}


def state_bytes(states: list[dict]) -> dict[str, int]:
    """The moments' bytes (Adam's m and v with their int8 scales, SGD's momentum buffer) and
    the rest of the state's (step counters, remainders), over ``states``."""
    moments = ("exp_avg", "momentum_buffer")
    items = [(key, t) for state in states for key, t in state.items()]
    return {
        "moments": sum(t.nbytes for key, t in items if key.startswith(moments)),
        "other state": sum(t.nbytes for key, t in items if not key.startswith(moments)),
    }


def bytes_per_param_in_backward(param_dtype: torch.dtype, cls=decoupled.AdamW, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(16))).to(param_dtype)
    params = list(model.parameters())
    optimizer = cls(params, **options)
    alive = [0]

    def count_alive(_):  # registered before the steps' hooks: sees this gradient too
        alive[0] = max(alive[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count_alive)
    decoupled.optim.step_in_backward(optimizer)
    model(torch.randn(8, 256, dtype=param_dtype)).float().square().mean().backward()
    assert all(p.grad is None for p in params)
    numel = sum(p.numel() for p in params)
    parts = {"θ": sum(p.nbytes for p in params), "g": alive[0]}
    parts |= state_bytes([optimizer.state[p] for p in params])
    return {key: value / numel for key, value in parts.items()}


def table_in_backward() -> str:
    lines = [HEADER]
    rows = (
        ("AdamW", "float32", torch.float32, "float32", {}),
        ("AdamW", "bfloat16 + compensation", torch.bfloat16, "int8", {"state_dtype": "int8"}),
        ("AdamW", "bfloat16 plain", torch.bfloat16, "int8",
         {"state_dtype": "int8", "compensate": False}),
    )  # fmt: skip
    for algorithm, label, dtype, state, options in rows:
        lines.append(_row(algorithm, label, state, bytes_per_param_in_backward(dtype, **options)))
    return "\n".join(lines)


def table() -> str:
    lines = [HEADER]
    weights = (
        ("float32", torch.float32, {}),
        ("bfloat16 + compensation", torch.bfloat16, {}),
        ("bfloat16 plain", torch.bfloat16, {"compensate": False}),
    )
    for label, dtype, options in weights:
        for state in (None, torch.bfloat16, "int8"):
            if state is torch.bfloat16 and dtype is torch.bfloat16:
                continue  # the same as θ's dtype
            parts = bytes_per_param(dtype, state_dtype=state, **options)
            name = "int8" if state == "int8" else str(state or dtype).removeprefix("torch.")
            lines.append(_row("AdamW", label, name, parts))
    for label, dtype, options in weights:
        parts = bytes_per_param(dtype, decoupled.SGDW, momentum=0.9, **options)
        compensated = dtype != torch.float32 and options.get("compensate") is not False
        name = "float32" if compensated else str(dtype).removeprefix("torch.")
        lines.append(_row("SGDW", label, name, parts))
    return "\n".join(lines)


def _row(algorithm: str, label: str, state: str, parts: dict[str, float]) -> str:
    return (
        f"{algorithm:<7}{label:<26}{state:<10}{parts['θ']:>6.2f}{parts['g']:>6.2f}"
        f"{parts['moments']:>9.3f}{parts['other state']:>8.3f}{sum(parts.values()):>8.3f}"
    )


if __name__ == "__main__":
    print(table())
    print("\nstepped inside backward (step_in_backward), 16 x Linear(256, 256):")
    print(table_in_backward())
