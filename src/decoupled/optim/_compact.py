"""Compact optimizer state: moments kept in bfloat16, rounded stochastically.

A bfloat16 has 8 significant bits, so an exponential moving average updated with
round-to-nearest stalls: once ``(1 − β2)·g²`` is below half an ulp of ``v``, ``v`` stops
changing. Stochastic rounding (rounding up with probability equal to the discarded fraction)
is unbiased, ``E[round(x)] = x``, so small updates survive on average (Gupta et al. 2015,
arXiv 1502.02551; the idea behind bitsandbytes' and torchao's low-precision optimizer states).

Rounding adds 16 random bits below a bfloat16's last bit of the float32 word and truncates.
The bits come from a hash of (element index, position of the tensor, step), not from a random
number generator: as fast as round-to-nearest, reproducible, and the same in the C++ kernel
(``csrc/arithmetic.h``) and in this reference, bit for bit. The position is the update's
``first_position`` (the parameters of the optimizer's earlier groups) plus the tensor's index
in the update's list, so tensors of different groups draw different bits at a step.

Memory per parameter, float32 parameters (θ and g included):

=========================  =========  ==============  ====================
state                      Adam       Adam + amsgrad  bytes moved per step
=========================  =========  ==============  ====================
float32 (default)          16 bytes   20 bytes        28
``state_dtype=bfloat16``   12 bytes   14 bytes        20
=========================  =========  ==============  ====================
"""

from __future__ import annotations

import torch
from torch import Tensor

#: ``torch.compiler.disable``, applied at the decorated function's first call: importing
#: ``torch._dynamo`` takes about 2 s, which a process that never steps (``decoupled --help``,
#: a refused argument, a report) need not pay. torch.optim decorates its own methods with it.
eager = getattr(torch, "_disable_dynamo", torch.compiler.disable)

COMPACT_STATE_DTYPES = (torch.bfloat16,)
_MASK32 = 0xFFFFFFFF


def _mix_int(x: int) -> int:
    """lowbias32 (Chris Wellons, hash-prospector) on a Python int in [0, 2³²)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix(x: Tensor) -> Tensor:
    """lowbias32 elementwise on int64 tensors holding uint32 values (products wrap mod 2⁶⁴,
    whose low 32 bits are the uint32 product's)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rounding_bits(numel: int, step: float, position: int, device: torch.device) -> Tensor:
    """32 random bits per element (int64 tensor) for the tensor at ``position`` at ``step``."""
    key = _mix_int(((int(step) * 0x9E3779B9) & _MASK32) ^ ((position * 0x85EBCA6B) & _MASK32))
    index = torch.arange(numel, dtype=torch.int64, device=device) & _MASK32
    return _mix(index ^ key)


def in_memory_order(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in the order they lie in memory (the kernel's
    element index), for any layout: contiguous, channels_last or another permutation."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost in memory first
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        raise ValueError(f"bfloat16 state needs a dense tensor, got strides {t.stride()}")
    return permuted.view(-1)


def stochastic_round_(out: Tensor, value: Tensor, random16: Tensor) -> None:
    """Write ``value`` into the bfloat16 tensor ``out`` (same shape and layout), rounded up
    with probability equal to the discarded fraction: ``(bits(value) + r) >> 16`` for ``r``
    uniform in [0, 2¹⁶), ``r[i]`` for the i-th element in memory order."""
    value = in_memory_order(value.float())
    word = value.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((word + random16) & _MASK32) >> 16
    rounded = torch.where(value.isnan(), 0x7FC0, rounded)  # NaN stays NaN
    in_memory_order(out.view(torch.int16)).copy_(rounded.to(torch.int16))


_NAMED = {"bfloat16": torch.bfloat16, "int8": torch.int8}


def check_state_dtype(state_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The moments' dtype a user asked for, as a torch dtype: None, ``torch.bfloat16`` (this
    module) or ``torch.int8`` (8-bit codes and scales, ``_int8.py``); their names too."""
    dtype = _NAMED.get(state_dtype, state_dtype) if isinstance(state_dtype, str) else state_dtype
    if dtype is not None and dtype not in COMPACT_STATE_DTYPES + (torch.int8,):
        raise ValueError(
            f"Invalid state_dtype value: {state_dtype} (None keeps the moments in the "
            f"parameters' dtype; or choose from {COMPACT_STATE_DTYPES + (torch.int8,)} or "
            "their names 'bfloat16', 'int8')"
        )
    return dtype


class CompactMoments:
    """The moments of one tensor for one reference step: float copies to compute in, written
    back to their bfloat16 storage with stochastic rounding by :meth:`store`. float16 moments
    (those of a compensated float16 θ, kept in θ's dtype as torch keeps them, while the step
    computes in float32) are written back rounded to nearest, as torch's ``copy_``: the
    stochastic rounding above is bfloat16's (the high half of a float32 word)."""

    def __init__(self, stored: list[Tensor], dtype: torch.dtype):
        self.stored = stored
        self.values = [t.to(dtype) for t in stored]  # same layout (preserve_format)

    # Inductor cannot compile the float <-> int bit views (torch 2.13): under torch.compile
    # the rounding runs eagerly, between compiled graphs.
    @eager
    def store(self, step: float | Tensor, position: int) -> None:
        first = self.stored[0]
        if first.dtype != torch.bfloat16:
            for out, value in zip(self.stored, self.values):
                out.copy_(value)
            return
        bits = rounding_bits(first.numel(), step, position, first.device)
        # the kernel's split of one hash: m gets the low 16 bits, v the high 16, max(v) a rehash
        for out, value, random16 in zip(
            self.stored, self.values, (bits & 0xFFFF, bits >> 16, _mix(bits) & 0xFFFF)
        ):
            stochastic_round_(out, value, random16)
