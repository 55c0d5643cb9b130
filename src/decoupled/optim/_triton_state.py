"""What state the Triton launcher (``_triton.py``) hands its kernel, and how the kernel reads it:
the moments' dtypes it takes beside each θ, compensated θ's remainders, int8 moments' scales
and the chunk of whole 256-blocks a program steps, and the pointer types and rounding of the
moments (``_triton_kernels.py``, ``_triton_compact.py``). The launcher refuses (the reference
loop steps instead) a list for which these return False or None."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from decoupled.optim._int8 import BLOCK as INT8_BLOCK
from decoupled.optim._int8 import SCALE_SUFFIX, blocks


def stand_in_remainders(
    params: list[Tensor], remainders: list[Tensor | None] | None
) -> list[Tensor]:
    """The remainders of compensated θ, with each uncompensated parameter standing in for
    its missing one (so that the layout checks pass it; the kernel does not read it)."""
    if remainders is None:
        return list(params)
    return [p if r is None else r for p, r in zip(params, remainders)]


def adam_dtypes_ok(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    remainders: list[Tensor | None] | None,
    coded: bool = False,
) -> bool:
    """Moments in θ's dtype, or bfloat16 (rounded stochastically) beside wider θ, or int8
    codes (``coded``, every tensor's) beside float32 θ; compensated θ (computed in float32)
    with bfloat16 or int8 moments, rounded stochastically as in the reference loop, and int8
    remainders; compensated float16 θ's float16 moments are rounded to nearest, as the
    reference loop's ``copy_``. int8 moments of uncompensated bfloat16/float16 θ
    (``compensate=False``, computed in θ's dtype by the reference loop) are left to it."""
    if coded:  # float32 θ, or compensated θ's float32 master, as the reference computes in
        remainders = remainders or [None] * len(params)
        return all(
            p.dtype == torch.float32 if r is None else r.dtype == torch.int8
            for p, r in zip(params, remainders)
        )
    for index, (p, m) in enumerate(zip(params, exp_avgs)):
        if remainders is not None and remainders[index] is not None:
            if m.dtype not in (p.dtype, torch.bfloat16) or remainders[index].dtype != torch.int8:
                return False
        elif m.dtype not in (p.dtype, torch.bfloat16):
            return False
    return True


def buffer_dtype(param: Tensor, remainder: Tensor | None) -> torch.dtype:
    """SGD's momentum buffer: float32 beside compensated θ (``_sgd_compensation.py``), else
    θ's dtype (as torch)."""
    return param.dtype if remainder is None else torch.float32


def sgd_dtypes_ok(
    params: list[Tensor], buffers: list[Tensor], remainders: list[Tensor | None] | None
) -> bool:
    """SGD's momentum buffers in :func:`buffer_dtype` and int8 remainders."""
    remainders = remainders or [None] * len(params)
    if any(r is not None and r.dtype != torch.int8 for r in remainders):
        return False
    return all(b.dtype == buffer_dtype(p, r) for p, b, r in zip(params, buffers, remainders))


def int8_scales(
    params: list[Tensor], coded_states: list[dict] | None
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The per-block scales of int8 moments (``_int8.py``), m's and v's, or None when a state
    is not coded as the kernel reads it: int8 m and uint8 v codes (checked beside θ by
    ``_refused``), contiguous float32 scales, one per block of 256, on θ's device."""
    if not coded_states:
        return None
    found: tuple[list[Tensor], list[Tensor]] = ([], [])
    for param, state in zip(params, coded_states):
        dtypes = (torch.int8, torch.uint8)
        for key, dtype, scales in zip(("exp_avg", "exp_avg_sq"), dtypes, found):
            scale = state.get(key + SCALE_SUFFIX)
            if (
                state.get(key) is None or state[key].dtype != dtype or scale is None
                or scale.dtype != torch.float32 or not scale.is_contiguous()
                or scale.shape != (blocks(param.numel()),) or scale.device != param.device
            ):  # fmt: skip
                return None
            scales.append(scale)
    return found


def int8_chunk(block: int) -> int:
    """Elements per program with int8 moments: ``block`` cut to whole blocks of 256, at
    least one."""
    return max(INT8_BLOCK, block // INT8_BLOCK * INT8_BLOCK)


def rounds(dtype: torch.dtype, state_dtype: torch.dtype, compensated: bool = False) -> bool:
    """bfloat16 moments computed in float32 (beside wider θ, or compensated θ's master weight)
    are rounded stochastically (``_compact.py``); moments in θ's own dtype round to nearest, as
    the reference's operations in that dtype do."""
    return state_dtype == torch.bfloat16 and (dtype != torch.bfloat16 or compensated)


def state_pointer_dtype(dtype: torch.dtype, state_dtype: torch.dtype, compensated: bool):
    import triton.language as tl

    if state_dtype == torch.int8:  # codes: the kernel reads them by their own types
        return tl.int8
    return tl.uint16 if rounds(dtype, state_dtype, compensated) else tl_dtypes()[state_dtype]


@cache
def tl_dtypes() -> dict:
    """torch's float dtypes as Triton's (built once triton is imported)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
