r"""Compensated low-precision weights: bfloat16/float16 θ plus an 8-bit remainder.

A bfloat16 weight has 8 significant bits: an update smaller than half an ulp, about
``2⁻⁹·|θ|``, rounds back to θ and is lost, and so is the decay ``θ·(1 − γλ)`` whenever
``γλ < 2⁻⁹``, i.e. at every usual learning rate. Training stalls where a float32 weight would
keep moving. The fix of FlashOptim (a 24-bit master weight: bfloat16 θ plus 8 extra bits) and,
with a full compensation buffer, of optimi's Kahan summation (Kahan 1965; Zamirai et al. 2020,
arXiv 2010.06192): keep what rounding removed and add it back before the next update.

Here the remainder is one signed byte per parameter, in units of 1/256 of θ's ulp:

.. math::
   w = \theta + r\cdot\operatorname{ulp}(\theta)/256,\qquad r \in [-128, 127]\ (\text{int8})

Each step reconstructs the float32 master weight ``w``, computes the decay and the update on
it in float32 (as for a float32 parameter), then stores ``θ ← round_to_nearest(w)`` and
``r ← (w − θ)·256/ulp(θ)`` rounded stochastically (unbiased). ``w`` is thus held to about 16
significant bits (8 of θ, 8 of r): updates down to ``2⁻¹⁷·|θ|`` are kept, against ``2⁻⁹·|θ|``
without compensation, and the model still sees and stores plain bfloat16 weights. ulp(θ) is
θ's dtype's spacing at θ (``2^{e−p}`` for ``θ = m·2^e``, ``m ∈ [0.5, 1)``, p = 8 for bfloat16
and 11 for float16; the subnormal spacing for zero and subnormal θ).

The remainder is kept in the optimizer state as ``param_remainder`` (int8, shaped and laid out
like θ), saved and loaded with the state dict; a checkpoint without it loads with r = 0.

Memory per parameter, AdamW, bfloat16 θ and g: 2 + 2 + 1 (remainder) + moments — 4 bytes in
bfloat16 (9 in all), about 2 in int8 (7 in all, ``_int8.py``). SGD/SGDW with momentum:
2 + 2 + 1 + 4, the momentum buffer of a compensated θ being float32 (``_sgd_compensation.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from decoupled.optim._compact import _mix, eager, in_memory_order, rounding_bits

REMAINDER = "param_remainder"
COMPENSATED_DTYPES = (torch.bfloat16, torch.float16)


def compensates(compensate: bool | None, param: Tensor) -> bool:
    """Whether ``param`` steps with a remainder: bfloat16/float16 θ unless ``compensate`` is
    False (None, the default, and True alike: float32 θ has nothing to compensate)."""
    return compensate is not False and param.dtype in COMPENSATED_DTYPES


def check_compensate(compensate: object) -> bool | None:
    if compensate is not None and not isinstance(compensate, bool):
        raise ValueError(
            f"Invalid compensate value: {compensate!r} (None or True: keep an 8-bit remainder "
            "for bfloat16/float16 parameters; False: plain low-precision updates, as torch)"
        )
    return compensate


def _unit(theta: Tensor) -> Tensor:
    """ulp(θ)/256 in float32, elementwise, for θ's dtype (the module docstring)."""
    info = torch.finfo(theta.dtype)
    precision = 1 - int(torch.frexp(torch.tensor(info.eps)).exponent) + 1  # eps = 2^(1−p)
    tiny_exponent = int(torch.frexp(torch.tensor(info.tiny)).exponent)
    exponent = torch.frexp(theta.float()).exponent
    exponent = torch.where((theta == 0) | (exponent < tiny_exponent), tiny_exponent, exponent)
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - precision - 8)


def master(theta: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master weight ``w = θ + r·ulp(θ)/256`` (same layout as θ)."""
    return theta.float() + remainder.float() * _unit(theta)


@eager
def store_(theta: Tensor, remainder: Tensor, weight: Tensor, step: float, position: int) -> None:
    """Write the float32 master ``weight`` back: θ rounded to nearest, r what was lost,
    rounded stochastically (unbiased, so that a steady update of 1.4 units is not kept as 1
    at every step) with bits from the moments' hash (``_compact.rounding_bits``, rehashed:
    the high 16 bits of ``mix(bits)``; bfloat16 moments use the others)."""
    theta.copy_(weight)
    bits = _mix(rounding_bits(theta.numel(), step, position, theta.device)) >> 16
    offset = torch.empty_like(weight)
    in_memory_order(offset).copy_((bits.float() + 0.5) / 65536)
    r = torch.floor((weight - theta.float()) / _unit(theta) + offset).clamp_(-128, 127)
    remainder.copy_(torch.where(weight.isfinite(), r, 0))


def check_remainder(where: str, value: object, param: Tensor) -> None:
    """A loaded remainder: an int8 tensor of the parameter's shape."""
    from decoupled.optim._loaded_state import refuse

    if not isinstance(value, Tensor):
        refuse(where, REMAINDER, type(value).__name__, "must be a tensor")
    if value.shape != param.shape:
        refuse(where, f"{REMAINDER} shape", tuple(value.shape), f"must be {tuple(param.shape)}")
    if value.dtype == torch.int8:
        return
    if not value.is_floating_point():
        refuse(where, f"{REMAINDER} dtype", value.dtype, "must be int8 (whole numbers)")
    # torch's load_state_dict casts it to θ's dtype: whole numbers of int8's range survive
    if not bool((value == value.round()).all()):
        refuse(where, REMAINDER, "fractions", "must be int8 (whole numbers)")
    outside = value[(value < -128) | (value > 127)]
    if outside.numel():
        refuse(where, REMAINDER, outside[0].item(), "must be within int8's [-128, 127]")


def init_remainder(compensate: bool | None, param: Tensor, state: dict) -> None:
    """The int8 remainder of compensated θ: created at the first step (r = 0: θ is the master
    weight), cast back from θ's dtype after a load (torch casts every floating state tensor
    to θ's dtype; whole numbers in [-128, 127] survive it exactly); dropped when
    compensation is off."""
    if not compensates(compensate, param):
        state.pop(REMAINDER, None)
    elif REMAINDER not in state:
        state[REMAINDER] = torch.zeros_like(param, dtype=torch.int8)
    elif state[REMAINDER].dtype != torch.int8:
        state[REMAINDER] = state[REMAINDER].to(torch.int8)
