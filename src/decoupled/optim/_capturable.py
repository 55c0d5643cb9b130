"""``capturable=True``: the decisions of the step template made on the device.

A captured CUDA graph replays kernels, not Python: a step may not read a device value on the
host (``.item()``, ``bool(tensor)``), which would also make it wait for the device. So where
the eager template (``_base.py``) reads a flag and returns early, a capturable step computes
the flag on the device and hands it to the Triton kernel, which then changes nothing
(``_triton.py``: step counts included), as torch's fused kernels take ``found_inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def device_skip_flag(
    optimizer, grads: list[Tensor], found_inf: Tensor | None, skip_nonfinite: bool
) -> Tensor | None:
    """A float32 device flag, nonzero when this step must change nothing: GradScaler's
    ``found_inf``, or (``skip_nonfinite``) a NaN/Inf in any gradient, found by one
    multi-tensor max-norm (NaN propagates through it). ``optimizer.skipped_steps`` counts the
    latter as a device tensor. None when nothing can skip the step."""
    flag = None if found_inf is None else (found_inf != 0).to(torch.float32)
    if skip_nonfinite and grads:
        norms = torch._foreach_norm(grads, float("inf"))
        nonfinite = (~torch.stack(norms).isfinite().all()).to(torch.float32)
        counted = nonfinite if flag is None else nonfinite * (1 - flag)
        if not torch.is_tensor(optimizer.skipped_steps):  # in place afterwards: a graph replays it
            optimizer.skipped_steps = torch.full(  # a fill on the device, not a copy to it
                (), float(optimizer.skipped_steps), device=nonfinite.device
            )
        optimizer.skipped_steps.add_(counted)
        flag = nonfinite if flag is None else torch.maximum(flag, nonfinite)
    return flag
