"""The Triton path: when it applies, and the launcher of ``_triton_kernels.py``.

Which parameters take it (the ``triton`` keyword of the optimizers):

- ``None`` (default): CUDA parameters when ``triton`` is importable (and ``fused`` is not
  False); without triton, CUDA parameters take the reference loop and one warning says so.
- ``True``: always; on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``,
  slow: for tests), anywhere else ``ValueError("Invalid triton value: True (...)")``.
- ``False``: never.

The launcher steps a whole list at once: the tensors are grouped by (device, θ dtype, state
dtype, compensated or not), and each group is one launch over a table of chunks
(``_triton_kernels.py``). The tables are cached by their content (addresses, sizes,
positions), so a training loop whose tensors stay put builds them once and a CUDA graph
replays them. It refuses (the reference loop steps instead, as for the C++ kernel) a list
with a tensor it cannot take: a tensor subclass, complex or float64 parameters, sparse
gradients, state or gradients laid out unlike their parameter (a gradient is first copied
into its parameter's layout), parameters sharing memory, step counters not on the
parameters' device, one lr per stacked run, or int8 moments of uncompensated
bfloat16/float16 θ. With int8 moments a program steps whole blocks of 256.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn import Parameter

from decoupled.optim._layout import in_layout_of, is_dense, overlapping
from decoupled.optim._shards import local
from decoupled.optim._triton_state import (
    adam_dtypes_ok,
    buffer_dtype,
    int8_chunk,
    int8_scales,
    rounds,
    sgd_dtypes_ok,
    stand_in_remainders,
    state_pointer_dtype,
    tl_dtypes,
)

#: Elements per program (one chunk); tests lower it to cross chunk boundaries cheaply.
BLOCK = 1024
NUM_WARPS = 4
_TABLE_CACHE_SIZE = 64
NUMEL = 7  # the element count's column in the tensor table (_triton_kernels.py)
_PLAIN = (Parameter, Tensor)
_THETA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned = False


@cache
def triton_available() -> bool:
    """True when ``triton`` imports (the ``triton`` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_option(
    triton: bool | None, fused: bool | None = None, capturable: bool = False
) -> None:
    """Refuse ``triton`` values that can never step: not a bool/None, True without triton
    installed, True with ``fused=False`` (which means the reference loop); and
    ``capturable=True`` without the Triton path, the one path that keeps every scalar on the
    device."""
    if capturable and (triton is False or fused is False):
        raise ValueError(
            f"Invalid capturable value: True with triton={triton}, fused={fused} (capturable "
            "steps run through the Triton kernel; fused=False, foreach=False and "
            "differentiable=True select the reference loop)"
        )
    if triton is not None and not isinstance(triton, bool):
        raise ValueError(f"Invalid triton value: {triton!r} (choose None, True or False)")
    if triton and not triton_available():
        raise ValueError(
            "Invalid triton value: True (triton is not installed: pip install 'decoupled[triton]')"
        )
    if triton and fused is False:
        raise ValueError(
            "Invalid triton value: True with fused=False (fused=False, or foreach=False or "
            "differentiable=True, selects the reference loop)"
        )


def use_triton(triton: bool | None, fused: bool | None, params: list[Tensor]) -> bool:
    """Whether a group's step takes the Triton path (module docstring)."""
    if triton is False or fused is False or not params:
        return False
    on_cuda = all(p.device.type == "cuda" for p in params)
    if triton:
        check_triton_option(triton, fused)
        if not on_cuda and not interpreting():
            devices = sorted({p.device.type for p in params})
            raise ValueError(
                f"Invalid triton value: True (parameters on {', '.join(devices)}: Triton runs "
                "on CUDA tensors, or on CPU tensors only under its interpreter, "
                "TRITON_INTERPRET=1)"
            )
        return True
    if not on_cuda or torch.compiler.is_compiling():
        return False
    if triton_available():
        return True
    _warn_once()
    return False


def check_capturable(group: dict, tensors: list[Tensor]) -> None:
    """``capturable=True`` needs the Triton path for this group's tensors (as torch's
    capturable needs CUDA tensors): refused before any group has changed. Not checked under
    torch.compile: dynamo marks every traced group capturable itself (its optimizer
    variable), and a compiled step runs the reference loop's operations in the graph."""
    if not group.get("capturable") or not tensors or torch.compiler.is_compiling():
        return
    if not use_triton(group.get("triton"), group.get("fused"), tensors):
        devices = ", ".join(sorted({t.device.type for t in tensors}))
        need = "CUDA tensors" if triton_available() else "triton (pip install 'decoupled[triton]')"
        raise ValueError(
            f"Invalid capturable value: True (parameters on {devices}: capturable steps run "
            f"through the Triton kernel, which needs {need}; CPU tensors only with "
            "triton=True under TRITON_INTERPRET=1)"
        )


def on_device_steps(state: dict, device: torch.device) -> None:
    """Move a step counter (created or loaded elsewhere) onto ``device``, once."""
    step = state.get("step")
    if torch.is_tensor(step) and step.device != device:
        state["step"] = step.to(device, torch.float32)


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "triton is not installed: CUDA parameters step through decoupled's reference loop "
            "(about ten passes over memory per tensor); pip install 'decoupled[triton]' for the "
            "one-pass kernels",
            stacklevel=5,
        )


def _split(value: float) -> tuple[float, float]:
    """A float64 as two float32 halves whose sum is within 2⁻⁴⁸ of it (scalar arguments of a
    Triton kernel are float32)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    lo = value - hi if math.isfinite(value) else 0.0
    return hi, lo


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float) -> Tensor:
    """(1 − β1ᵗ, sqrt(1 − β2ᵗ)) per tensor, float64, computed on the steps' device: a few
    small launches and no host read (the reference computes them in double on the host)."""
    counts = torch.stack(steps).to(torch.float64)
    corrections = (1 - torch.pow(beta1, counts), (1 - torch.pow(beta2, counts)).sqrt())
    return torch.stack(corrections, dim=1).contiguous()


class _Scalar:
    """A hyperparameter as the kernels take it: a device tensor (read in the kernel, no host
    sync) or a number (split into float32 halves)."""

    def __init__(self, value: float | Tensor, device: torch.device, dummy: Tensor):
        if isinstance(value, Tensor) and value.device == device:
            self.hi, self.lo, self.ptr, self.is_tensor = 0.0, 0.0, value, True
        else:  # a number, or a CPU tensor beside CUDA parameters (read without a device sync)
            self.hi, self.lo = _split(float(value))
            self.ptr, self.is_tensor = dummy, False


def _refused(
    params: list[Tensor], grads: list[Tensor], state: list[list[Tensor]], lr, steps
) -> bool:
    """True when the launcher cannot take this list (module docstring)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        return True
    for index, param in enumerate(params):
        if type(param) not in _PLAIN or param.dtype not in _THETA_DTYPES or not is_dense(param):
            return True
        grad = grads[index]
        if type(grad) not in _PLAIN or grad.layout != torch.strided or grad.dtype != param.dtype:
            return True
        for t in (grad, *(s[index] for s in state)):
            if t.stride() != param.stride() or t.shape != param.shape or t.device != param.device:
                return True
        if steps is not None:
            step = steps[index]
            if step.device != param.device or step.dtype != torch.float32 or step.numel() != 1:
                return True
    return overlapping(params)


_tables: OrderedDict[tuple, Tensor] = OrderedDict()


def _tables_for(
    rows: list[tuple[int, ...]], device: torch.device, block: int
) -> tuple[Tensor, Tensor]:
    """The tensor table and the chunk table of these rows on ``device``, each cached by its
    content: the chunk table (the large one: a row per ``block`` elements) depends only on
    the sizes, so gradients reallocated at every step (``zero_grad()`` sets them to None)
    cost only a new tensor table, a few bytes per tensor copied without waiting."""
    numels = tuple(row[NUMEL] for row in rows)
    table = _cached((device, "tensors", *rows), lambda: rows, device)
    chunk_table = _cached(
        (device, "chunks", block, *numels),
        lambda: [(row, first) for row, n in enumerate(numels) for first in range(0, n, block)],
        device,
    )
    return table, chunk_table.reshape(-1, 2)


def _cached(key: tuple, content: Callable[[], list], device: torch.device) -> Tensor:
    found = _tables.get(key)
    if found is not None:
        _tables.move_to_end(key)
        return found
    table = torch.tensor(content(), dtype=torch.int64)
    if device.type == "cuda":  # from pinned memory the copy does not wait for the device
        table = table.pin_memory().to(device, non_blocking=True)
    _tables[key] = table
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _by_kind(
    params: list[Tensor], state: list[Tensor], remainders: list[Tensor | None] | None = None
) -> dict[tuple, list[int]]:
    """Indices of the list grouped by (device, θ dtype, state dtype, compensated): one launch
    each."""
    kinds: dict[tuple, list[int]] = {}
    for index, param in enumerate(params):
        compensated = remainders is not None and remainders[index] is not None
        kind = (param.device, param.dtype, state[index].dtype if state else param.dtype)
        kinds.setdefault((*kind, compensated), []).append(index)
    return kinds


def _bump_versions(*lists: list[Tensor]) -> None:
    """What torch's in-place operations do, so that autograd still notices a tensor changed
    between a forward pass and its backward ("modified by an inplace operation")."""
    for tensors in lists:
        torch.autograd.graph.increment_version(tensors)


def _set(**options) -> dict:
    """The optional keyword arguments that are set (not None, not False), for a fallback to
    receive just what its caller passed."""
    return {
        name: value for name, value in options.items() if value is not None and value is not False
    }


def _skip_and_scale(
    grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device, dummy: Tensor
) -> tuple[Tensor, bool, Tensor, bool]:
    scale = grad_scale is not None
    skip = found_inf is not None
    return (
        grad_scale.to(device) if scale else dummy,
        scale,
        found_inf.to(device) if skip else dummy,
        skip,
    )


def triton_adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    fallback: Callable,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    decay_rate: float | Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    references: list[Tensor | None] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    cautious: bool = False,
    remainders: list[Tensor | None] | None = None,
    coded_states: list[dict] | None = None,
    first_position: int = 0,
) -> None:
    """:func:`decoupled.optim.adam.adam_update` (same arguments) through the Triton kernel,
    or through ``fallback`` when the launcher refuses the list. ``found_inf``: a device flag;
    nonzero makes the step change nothing (step counts included), decided on the device.
    With ``coded_states`` (int8 moments) each program steps whole blocks of 256 elements."""
    from decoupled.optim import _triton_kernels as kernels

    refs = [] if references is None or references[0] is None else list(references)
    grads = [in_layout_of(p, g) for p, g in zip(params, grads)]
    state = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [refs] * bool(refs)
    remainders = local(remainders)  # DTensor shards' remainders: their local tensors, as θ's
    kept = stand_in_remainders(params, remainders)
    if not params:
        return
    scales = int8_scales(params, coded_states)
    if (
        _refused(params, grads, state + [kept], lr, state_steps)
        or not adam_dtypes_ok(params, exp_avgs, remainders, coded=scales is not None)
        or (coded_states is not None and (scales is None or amsgrad))
    ):  # fmt: skip
        given = {
            "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
            "decoupled": decoupled, "decay_rate": decay_rate, "amsgrad": amsgrad,
            "maximize": maximize, "references": references,
        }  # fmt: skip
        given |= _set(cautious=cautious, grad_scale=grad_scale, remainders=remainders,
                      coded_states=coded_states, first_position=first_position)  # fmt: skip
        if found_inf is not None and bool(found_inf):  # the reference loop reads it on the host
            return
        fallback(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **given)
        return

    decay = _decay_mode(decoupled, weight_decay, decay_rate)
    for (device, dtype, state_dtype, compensated), indices in _by_kind(
        params, exp_avgs, remainders
    ).items():
        dummy = state_steps[indices[0]]
        steps = [state_steps[i] for i in indices]
        if found_inf is None:
            torch._foreach_add_(steps, 1)
        else:  # the step counts advance only when the step is taken
            torch._foreach_add_(steps, 1 - found_inf.to(device, torch.float32))
        rows = [
            (
                params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                exp_avg_sqs[i].data_ptr(), _address(max_exp_avg_sqs[i]) if amsgrad else 0,
                refs[i].data_ptr() if refs else 0, state_steps[i].data_ptr(),
                params[i].numel(), first_position + i, kept[i].data_ptr() if compensated else 0,
                *((scales[0][i].data_ptr(), scales[1][i].data_ptr()) if scales else (0, 0)),
            )
            for i in indices
        ]  # fmt: skip
        block = int8_chunk(BLOCK) if scales else BLOCK
        table, chunks = _tables_for(rows, device, block)
        if chunks.shape[0] == 0:  # only empty tensors
            continue
        lr_arg = _Scalar(lr, device, dummy)
        rate_arg = _Scalar(decay_rate if decay == kernels.DECOUPLED_DECAY else 0.0, device, dummy)
        scale_ptr, scale, skip_ptr, skip = _skip_and_scale(grad_scale, found_inf, device, dummy)
        beta1, beta2 = float(beta1), float(beta2)
        kernels.adam_kernel[(chunks.shape[0],)](
            chunks, table,
            lr_arg.hi, lr_arg.lo, lr_arg.ptr, rate_arg.hi, rate_arg.lo, rate_arg.ptr,
            scale_ptr, skip_ptr,
            _bias_corrections(steps, beta1, beta2), beta1, beta2,
            float(eps), float(weight_decay),
            DTYPE=tl_dtypes()[dtype], STATE=state_pointer_dtype(dtype, state_dtype, compensated),
            ROUND=rounds(dtype, state_dtype, compensated), DECAY=decay, REF=bool(refs),
            AMSGRAD=amsgrad, MAXIMIZE=maximize, CAUTIOUS=bool(cautious),
            LR_TENSOR=lr_arg.is_tensor, RATE_TENSOR=rate_arg.is_tensor, SCALE=scale, SKIP=skip,
            COMPENSATE=compensated, CODED=scales is not None, BLOCK=block,
            LR_F32=isinstance(lr, Tensor), num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    _bump_versions(params, exp_avgs, exp_avg_sqs, state_steps)
    _bump_versions([r for r in remainders or [] if r is not None])
    if scales:
        _bump_versions(*scales)
    if amsgrad:
        _bump_versions(max_exp_avg_sqs)
    if grad_scale is not None:
        _bump_versions(grads)


def triton_sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    fallback: Callable,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled: bool,
    decay_rate: float | Tensor = 0.0,
    maximize: bool = False,
    references: list[Tensor | None] | None = None,
    grad_scale: Tensor | None = None,
    cautious: bool = False,
    remainders: list[Tensor | None] | None = None,
    step: float = 1.0,
    first_position: int = 0,
) -> None:
    """:func:`decoupled.optim.sgd.sgd_update` (same arguments) through the Triton kernel, or
    through ``fallback`` when the launcher refuses the list; new momentum buffers are written
    back into ``momentum_buffers`` as the reference does (float32 for compensated θ)."""
    from decoupled.optim import _triton_kernels as kernels

    if not params:
        return
    refs = [] if references is None or references[0] is None else list(references)
    grads = [in_layout_of(p, g) for p, g in zip(params, grads)]
    remainders = local(remainders) or None  # DTensor shards: their local tensors, as θ's
    kept = stand_in_remainders(params, remainders)
    has_momentum = momentum != 0
    fresh = [b is None for b in momentum_buffers] if has_momentum else [False] * len(params)
    buffers = [
        torch.empty_like(p, dtype=buffer_dtype(p, r)) if f else b
        for p, r, f, b in zip(params, remainders or [None] * len(params), fresh, momentum_buffers)
    ]
    state = ([buffers] if has_momentum else []) + ([refs] if refs else [])
    if (
        _refused(params, grads, state + [kept], lr, None)
        or any(g.is_sparse for g in grads)
        or not sgd_dtypes_ok(params, buffers if has_momentum else [], remainders)
    ):  # fmt: skip
        given = {
            "lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
            "weight_decay": weight_decay, "decoupled": decoupled, "decay_rate": decay_rate,
            "maximize": maximize, "references": references,
        }  # fmt: skip
        given |= _set(cautious=cautious, grad_scale=grad_scale, remainders=remainders,
                      step=step if remainders is not None else None,
                      first_position=first_position)  # fmt: skip
        fallback(params, grads, momentum_buffers, **given)
        return

    decay = _decay_mode(decoupled, weight_decay, decay_rate)
    for (device, dtype, _, compensated), indices in _by_kind(params, [], remainders).items():
        dummy = params[indices[0]]
        rows = [
            (
                params[i].data_ptr(), grads[i].data_ptr(),
                buffers[i].data_ptr() if has_momentum else 0, 0, 0,
                refs[i].data_ptr() if refs else 0, first_position + i, params[i].numel(),
                int(fresh[i]),
                kept[i].data_ptr() if compensated else 0, 0, 0,
            )
            for i in indices
        ]  # fmt: skip
        table, chunks = _tables_for(rows, device, BLOCK)
        if chunks.shape[0] == 0:  # only empty tensors
            continue
        lr_arg = _Scalar(lr, device, dummy)
        rate_arg = _Scalar(decay_rate if decay == kernels.DECOUPLED_DECAY else 0.0, device, dummy)
        scale_ptr, scale, skip_ptr, skip = _skip_and_scale(grad_scale, None, device, dummy)
        kernels.sgd_kernel[(chunks.shape[0],)](
            chunks, table,
            lr_arg.hi, lr_arg.lo, lr_arg.ptr, rate_arg.hi, rate_arg.lo, rate_arg.ptr,
            scale_ptr, skip_ptr, float(momentum), float(dampening), float(weight_decay),
            int(step), DTYPE=tl_dtypes()[dtype],
            BUFFER=tl_dtypes()[torch.float32 if compensated else dtype], DECAY=decay,
            REF=bool(refs), MOMENTUM=has_momentum, NESTEROV=bool(nesterov), MAXIMIZE=maximize,
            CAUTIOUS=bool(cautious), LR_TENSOR=lr_arg.is_tensor,
            RATE_TENSOR=rate_arg.is_tensor, SCALE=scale, SKIP=skip, COMPENSATE=compensated,
            BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    if has_momentum:
        momentum_buffers[:] = buffers
        _bump_versions(buffers)
    _bump_versions([r for r in remainders or [] if r is not None])
    _bump_versions(params)
    if grad_scale is not None:
        _bump_versions(grads)


def _decay_mode(decoupled: bool, weight_decay: float, decay_rate: float | Tensor) -> int:
    from decoupled.optim._triton_kernels import DECOUPLED_DECAY, L2_DECAY, NO_DECAY

    if decoupled:
        zero = not isinstance(decay_rate, Tensor) and decay_rate == 0
        return NO_DECAY if zero else DECOUPLED_DECAY
    return L2_DECAY if weight_decay != 0 else NO_DECAY
