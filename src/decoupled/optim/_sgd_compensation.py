"""SGD/SGDW's state for compensated bfloat16/float16 weights (``_compensated.py``).

Rules:

- A compensated θ keeps its int8 remainder (``param_remainder``) and a float32 momentum
  buffer: the update is computed in float32 on the master weight θ + remainder, and a
  bfloat16 buffer would round the direction that moves it to 8 significant bits at each step.
  (Adam/AdamW keep m and v in θ's dtype or ``state_dtype`` instead, stochastically rounded.)
- An uncompensated θ (``compensate=False``, float32 θ, a differentiable step) keeps its buffer
  in θ's dtype and no remainder, exactly as torch.optim.SGD.
- A state dict keeps a float32 buffer float32 through a save and load (torch would cast it
  to θ's dtype); each step first brings the state in line with the group's ``compensate``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from operator import attrgetter

import torch
from torch import Tensor

from decoupled.optim._compensated import (
    COMPENSATED_DTYPES,
    REMAINDER,
    compensates,
    init_remainder,
)

BUFFER = "momentum_buffer"


def buffer_dtype(compensated: bool, param: Tensor) -> torch.dtype:
    """The momentum buffer's dtype: float32 for compensated θ, else θ's (as torch)."""
    return torch.float32 if compensated else param.dtype


def compensation_state(state: MutableMapping, group: dict, params: list[Tensor]) -> bool:
    """Whether the group steps compensated θ; creates, casts or drops the remainders of its
    bfloat16/float16 tensors and casts their buffers to :func:`buffer_dtype`. Differentiable
    steps record torch's operations on θ itself: not compensated. Only low-precision tensors
    are visited: a float32 group's step pays one set of dtypes."""
    if set(map(attrgetter("dtype"), params)).isdisjoint(COMPENSATED_DTYPES):
        return False
    low = [p for p in params if p.dtype in COMPENSATED_DTYPES]
    compensate = group.get("compensate")
    compensated = not group.get("differentiable") and any(compensates(compensate, p) for p in low)
    for p in low:
        state_p = state[p]
        init_remainder(compensate if compensated else False, p, state_p)
        buffer = state_p.get(BUFFER)
        dtype = buffer_dtype(compensated, p)
        if buffer is not None and buffer.dtype != dtype:
            state_p[BUFFER] = buffer.to(dtype)
    return compensated


def saved_float32_buffers(state_dict: dict, param_groups: list[dict]) -> list[tuple]:
    """(θ, ``momentum_buffer``, buffer) for each float32 buffer that ``state_dict`` holds for a
    bfloat16/float16 θ of ``param_groups`` (paired by position, as torch pairs them)."""
    saved = state_dict["state"]
    return [
        (param, BUFFER, saved[key][BUFFER])
        for saved_group, group in zip(state_dict["param_groups"], param_groups)
        for key, param in zip(saved_group["params"], group["params"])
        if isinstance(saved.get(key, {}).get(BUFFER), Tensor)
        and saved[key][BUFFER].dtype == torch.float32
        and param.dtype in COMPENSATED_DTYPES
    ]


def drop_unused_remainders(state: MutableMapping, param_groups: list[dict]) -> None:
    """Drop the remainders loaded for θ that is not bfloat16/float16: they have no use."""
    for group in param_groups:
        for param in group["params"]:
            if param.dtype not in COMPENSATED_DTYPES:
                state.get(param, {}).pop(REMAINDER, None)
