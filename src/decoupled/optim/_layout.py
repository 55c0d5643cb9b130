"""Memory layouts: whether a tensor is dense, and copies laid out like a parameter.

The fast paths (``_kernels.py``) take only gradients and state laid out like their parameter;
the optimizers (``_base.py``) re-lay loaded state and θ₀ with :func:`in_layout_of` once, so
that the fast paths keep taking them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def in_layout_of(param: Tensor, tensor: Tensor) -> Tensor:
    """``tensor``, or a copy of it laid out like ``param`` (same strides) when it is not but
    can be: same shape and device, and ``param`` dense (:func:`is_dense`). The fast paths take
    only gradients and state laid out like their parameter."""
    if tensor.layout != torch.strided or tensor.stride() == param.stride():
        return tensor
    if tensor.shape != param.shape or tensor.device != param.device or not is_dense(param):
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps or overlaps, in any order of
    dimensions (contiguous, channels_last, transposed): torch's "non-overlapping and dense",
    which ``torch.empty_like`` preserves. Sorted by stride, each dimension of size > 1 must
    step over exactly the elements of the dimensions inside it."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda dim: dim[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def overlapping(tensors: list[Tensor]) -> bool:
    """Whether two of these strided tensors share a byte of memory, from the address range
    each spans (a conservative test for interleaved views; empty tensors span nothing). The
    kernels write or divide each tensor of a list in parallel, so they refuse such lists."""
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        start = t.data_ptr()
        spans.append((start, start + extent * t.element_size()))
    spans.sort()
    return any(spans[i][0] < spans[i - 1][1] for i in range(1, len(spans)))
