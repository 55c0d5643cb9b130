"""Checks on the per-parameter state of a checkpoint, made before any of it is loaded.

A damaged checkpoint must fail loudly and at once, on every implementation path: a negative
``step`` makes Adam's bias correction ``1 − β^t`` zero or negative (torch's loop divides by
zero, a one-pass kernel writes NaN into θ without a word), a negative ``exp_avg_sq`` has no
square root, and a NaN or Inf in any moment spreads into every parameter it touches at the
next step. Moments whose shape differs from their parameter's cannot be stepped at all.

Rules (each error names the parameter's index in the state dict, its group and the field):

- ``step``: a number or one-element real tensor, finite, ``>= 0`` and whole (torch.optim
  counts steps in a float32 tensor holding whole numbers).
- a moment (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``) and θ₀
  (``init_param``): a tensor of the parameter's shape, of a floating-point dtype (complex for
  a complex parameter; loading casts it to the parameter's dtype, as torch.optim does),
  every element finite; the second moments also ``>= 0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def refuse(where: str, field: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("Invalid state for {where}: {field} = {value} ({rule})")``."""
    raise ValueError(f"Invalid state for {where}: {field} = {value} ({rule})")


def check_step(where: str, step: Any) -> None:
    """``step``: finite, ``>= 0`` and whole, as a number or a one-element real tensor."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            refuse(where, "step", f"tensor of shape {tuple(step.shape)}", "must be one number")
        value = float(step.item())
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        refuse(where, "step", repr(step), "must be a number")
    if not (math.isfinite(value) and value >= 0 and value.is_integer()):
        refuse(where, "step", value, "must be finite and >= 0, a whole number of steps")


def check_like_param(
    where: str, field: str, value: Any, param: Tensor, *, nonnegative: bool = False
) -> None:
    """A state tensor stepped alongside ``param``: its shape, a usable dtype, finite values
    (and ``>= 0`` when ``nonnegative``). Sparse tensors (SGD's momentum for sparse
    gradients) are checked on their stored values."""
    if not isinstance(value, Tensor):
        refuse(where, field, type(value).__name__, "must be a tensor")
    if value.shape != param.shape:
        rule = f"must be the parameter's shape {tuple(param.shape)}"
        refuse(where, f"{field} shape", tuple(value.shape), rule)
    usable = value.is_complex() if param.is_complex() else value.is_floating_point()
    if not usable:
        kind = "complex" if param.is_complex() else "floating-point"
        refuse(where, f"{field} dtype", value.dtype, f"must be {kind}, like the parameter")
    values = value.coalesce().values() if value.is_sparse else value
    if values.is_complex():
        values = torch.view_as_real(values)
    bad = ~torch.isfinite(values)
    if nonnegative:
        bad |= values < 0
    if bool(bad.any()):  # a DTensor's any() reduces over its mesh: every rank refuses alike
        shown = _local(values)[_local(bad)].flatten()[:1].tolist()
        value = f"{shown[0]} (an element)" if shown else "a bad element (in another shard)"
        rule = "must be finite and >= 0" if nonnegative else "must be finite"
        refuse(where, field, value, rule)


def _local(tensor: Tensor) -> Tensor:
    """A sharded tensor's (DTensor, FSDP2) local shard; any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
