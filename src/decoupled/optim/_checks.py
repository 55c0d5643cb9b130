"""Argument checks shared by the optimizers: torch.optim's rules, in torch's order and, where
torch raises the same error for the same input, in torch's words (``torch/optim/adam.py``,
``torch/optim/sgd.py``, ``torch/optim/optimizer.py``); otherwise one pattern naming the value,
``Invalid weight_decay value: -0.1``. ``tests/optim/test_torch_optim_db.py`` holds them to
torch's own error inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from decoupled.optim.decay import DECAY_SCALES, DECAY_TARGETS


def check_argument(name: str, value: Any, valid: bool, rule: str = "") -> None:
    """Raise ``ValueError("Invalid {name} value: {value}")`` (torch's pattern) unless ``valid``.

    ``rule`` is appended after a colon when given, so the message also says what is allowed.
    """
    if not valid:
        suffix = f" ({rule})" if rule else ""
        raise ValueError(f"Invalid {name} value: {value}{suffix}")


def is_number(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_float(value: float | Tensor, name: str = "lr") -> float:
    """A Python float from a number or a one-element tensor (for checks, never for math);
    anything else raises ``Invalid {name} value``."""
    if isinstance(value, Tensor):
        shown = f"tensor of shape {tuple(value.shape)}"
        check_argument(name, shown, value.numel() == 1, f"Tensor {name} must be 1-element")
        real = not value.is_complex() and value.dtype != torch.bool
        check_argument(name, shown, real, "must be a number or a one-element real tensor")
        return float(value.item())
    check_argument(name, repr(value), is_number(value), "must be a number")
    return float(value)


def check_lr(lr: float | Tensor) -> None:
    lr_value = as_float(lr)
    check_argument("lr", lr, math.isfinite(lr_value) and lr_value >= 0, "must be finite and >= 0")


def check_weight_decay(weight_decay: float | Callable[[int], float]) -> None:
    if callable(weight_decay):  # a schedule step -> λ, checked each time it is called
        return
    value = as_float(weight_decay, "weight_decay")
    check_argument(
        "weight_decay",
        weight_decay,
        math.isfinite(value) and value >= 0,
        "must be finite and >= 0",
    )


def check_params_argument(params: Any) -> None:
    """torch accepts any iterable; a bare tensor or an exhausted generator is a common slip."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"but got a single {torch.typename(params)}; wrap it in a list: [tensor]"
        )


#: Group options that only a decoupled decay has (AdamW, SGDW); see ``decay.py``.
DECOUPLED_OPTIONS = ("decay_scale", "max_lr", "lambda_norm", "decay_period")


def decay_defaults(*, decoupled: bool, decay_to: str = "zero", **decoupled_options) -> dict:
    """The weight-decay options of a param group (see ``decay.py``).

    L2 optimizers (Adam, SGD) take only ``decay_to``; ``decay_scale``, ``max_lr``,
    ``lambda_norm`` and ``decay_period`` scale a decoupled decay (AdamW, SGDW).
    ``decoupled_weight_decay`` records which of the two the group uses, as torch.optim.Adam's
    groups do, so that a checkpoint is never loaded into the other algorithm.
    """
    unknown = sorted(set(decoupled_options) - set(DECOUPLED_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    if not decoupled and decoupled_options:
        names = ", ".join(sorted(decoupled_options))
        raise TypeError(f"{names}: only for decoupled weight decay (AdamW, SGDW), not L2")
    return {"decay_to": decay_to, "decoupled_weight_decay": decoupled, **decoupled_options}


class ImplementationConflict(ValueError, RuntimeError):
    """``foreach=True`` with ``fused=True``: a ValueError by this project's rule (a bad
    argument), and the RuntimeError torch.optim raises for it, so that code catching either
    keeps working."""


def torch_implementation_options(
    fused: bool | None, foreach: bool | None, capturable: bool, differentiable: bool
) -> bool | None:
    """torch.optim's implementation switches, accepted so that torch code runs unchanged.

    ``foreach=False`` asks torch for its single-tensor loop, which our reference loop equals
    bit for bit: it selects ``fused=False`` unless ``fused`` is given. ``differentiable``
    (autograd through the step, as torch's) steps through the reference loop, which torch's
    fused kernels cannot do (torch: "`fused` does not support `differentiable`").
    ``capturable`` (CUDA graphs) is checked with the ``triton`` option (``_triton.py``).
    """
    if foreach and fused:
        raise ImplementationConflict(
            "Invalid foreach value: True with fused=True (`fused` and `foreach` cannot be "
            "`True` together.)"
        )
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if differentiable or (foreach is False and fused is None):
        return False
    return fused


def check_fusable(params: list[Tensor]) -> None:
    """torch's rule for ``fused=True``, checked at the step as torch checks it
    (``torch/optim/optimizer.py``, ``_device_dtype_check_for_fused``), with its message:
    floating-point parameters on a device that has fused kernels (not complex ones, not the
    meta device)."""
    devices = _get_fused_kernels_supported_devices()
    for p in params:
        if not (p.device.type in devices and torch.is_floating_point(p)):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}"
            )


def check_group(group: dict, decoupled: bool) -> None:
    """Validate one param group's decay options and lr (every group, not only the defaults)."""
    check_lr(group["lr"])
    check_weight_decay(group["weight_decay"])
    decay_to = group.get("decay_to", "zero")
    check_argument(
        "decay_to", repr(decay_to), decay_to in DECAY_TARGETS, f"choose from {DECAY_TARGETS}"
    )
    if not decoupled:
        for name in DECOUPLED_OPTIONS:
            if group.get(name) is not None:
                check_argument(name, repr(group[name]), False, "only for AdamW and SGDW, not L2")
        return
    decay_scale = group.get("decay_scale", "lr")
    check_argument(
        "decay_scale", repr(decay_scale), decay_scale in DECAY_SCALES, f"choose from {DECAY_SCALES}"
    )
    lambda_norm, max_lr = group.get("lambda_norm"), group.get("max_lr")
    if lambda_norm is not None:
        value = as_float(lambda_norm, "lambda_norm")
        valid = math.isfinite(value) and value >= 0
        check_argument("lambda_norm", lambda_norm, valid, "must be finite and >= 0")
    if max_lr is not None:
        value = as_float(max_lr, "max_lr")
        check_argument("max_lr", max_lr, math.isfinite(value) and value > 0, "must be > 0")
    period = group.get("decay_period")
    if period is not None:
        valid = is_number(period) and float(period).is_integer() and period > 0  # 100.0 too
        check_argument("decay_period", repr(period), valid, "must be a whole number of steps > 0")
    if lambda_norm is not None and callable(group["weight_decay"]):
        raise ValueError(
            "Invalid lambda_norm value: give either lambda_norm or a weight_decay schedule"
        )


def check_tensor_hyperparameters(
    lr: float | Tensor, betas: tuple, *, foreach: bool | None, capturable: bool
) -> None:
    """torch.optim.Adam's refusals for tensor hyperparameters with ``foreach=True``: its
    multi-tensor path reads lr and betas as numbers unless ``capturable`` (same messages)."""
    if not foreach or capturable:
        return
    if isinstance(lr, Tensor):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for index, beta in enumerate(betas if isinstance(betas, (tuple, list)) else ()):
        if isinstance(beta, Tensor):
            raise ValueError(
                f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True"
            )


def checked_betas(betas: tuple) -> tuple:
    """(β1, β2), each a number or a one-element tensor in [0, 1), both of one kind (torch's
    rule and wording). Tensors stay tensors, as in torch (a [1]-shaped one is read as 0-dim):
    the step reads them each time, so an in-place change takes effect."""
    is_pair = isinstance(betas, (tuple, list)) and len(betas) == 2
    check_argument("betas", repr(betas), is_pair, "must be a pair (β1, β2)")
    for index, beta in enumerate(betas):
        value = as_float(beta, f"betas[{index}]")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    return tuple(b.view(()) if isinstance(b, Tensor) and b.dim() > 0 else b for b in betas)
