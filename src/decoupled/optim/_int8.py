r"""8-bit optimizer moments (``state_dtype="int8"``): blockwise codes with one float32 scale.

The elements of a tensor, in memory order (the kernels' element index), are cut into blocks
of ``BLOCK = 256``; each block keeps one float32 scale, its largest magnitude, and one byte per
element. The code is non-linear, so that small values keep precision (the idea of
bitsandbytes' blockwise 8-bit optimizers, Dettmers et al. 2022, arXiv 2110.02861, and of
FlashOptim's companded moments); here a square law, whose levels are integer squares (so
that coding needs no division per element):

.. math::
   m = s_m\,\operatorname{sign}(q)\,(|q|/127)^2,\quad q \in [-127, 127]\ (\text{int8})
   \qquad
   v = s_v\,(q/255)^4,\quad q \in [0, 255]\ (\text{uint8}),

i.e. m and √v each with a square-law code, v's unsigned because it is ≥ 0. ``s`` is the
block's largest ``|m|`` (largest ``v``), so the largest element of a block is coded exactly
(``|q| = 127``, ``q = 255``; for m where that largest ``|m|`` is above about 10⁻³⁴, see
``encode_``) and every other one lies between two neighbouring codes.

**Rounding.** A value ``x`` between the decoded neighbours ``d(q) ≤ x < d(q+1)`` is stored as
``q + 1`` with probability ``(x − d(q)) / (d(q+1) − d(q))``, else ``q``: unbiased in value,
``E[decode] = x`` (stochastic rounding, Gupta et al. 2015, arXiv 1502.02551), so the moving
averages do not stall on updates below a code step, as for ``bfloat16`` state. The
probability is resolved in steps of 2⁻¹⁶, so a value below about 2⁻¹⁷ of the step from zero to
the first code (m: 5·10⁻¹⁰ of the block's largest, v: 2·10⁻¹⁵) always codes 0. The random 16
bits come from the same hash as bfloat16 state (``_compact.rounding_bits``: m the low 16 bits,
v the high 16), so runs are reproducible.

**Arithmetic.** Codes are decoded with multiplications by float32 constants,
``m = ((q·|q|)·c_m)·s`` and ``v = ((q·q·c_v)²)·s``, ``c = fl(1/levels²)`` (``q·|q|``, ``q·q`` are
exact, ``levels²·c = 1`` exactly, so the largest code decodes to ``s`` exactly). Coding scales
each value so that the levels become integers: ``y = |m|·k_m`` (``k_m ≈ 127²/s``) lies among
the levels ``q²``, whose gaps ``2q + 1`` need no division; v is coded from √v, which the step
has computed anyway, ``f = √v·k_v`` (``k_v ≈ 255²/√s``), whose square lies among ``q⁴``.
The code below is ``⌊√y⌋`` (``⌊√f⌋``) from a correctly rounded root; no table, no division
per element, so that the C++ kernel's loops vectorize. ``encode_`` states the float32
operations, which every implementation repeats in the same order and so writes the same codes.

**Error bound.** One rounding moves a value by less than one code step:

.. math::
   |\tilde m - m| < s_m\,\frac{2|q|+1}{127^2} \le \frac{2\sqrt{s_m |m|}}{127} + \frac{s_m}{127^2}
   \qquad
   |\sqrt{\tilde v} - \sqrt v| < \sqrt{s_v}\,\frac{2q+1}{255^2}
      \le \frac{2\,(s_v v)^{1/4}}{255} + \frac{\sqrt{s_v}}{255^2},

at most ``1.6 %`` of the block's largest ``|m|`` and ``0.8 %`` of its largest ``√v``, and
relatively finer for small values (a float32 would be exact; a linear 8-bit code would lose
every value below ``s/255``). The errors of successive steps are independent and of mean 0,
so in the moving averages they add like a random walk damped by β, and stay bounded
(``tests/optim/test_int8_state.py`` runs 1000 steps on a quadratic).

The update itself is computed in float32 from the decoded moments, as for bfloat16 state; only
what is stored is rounded.

**State dict.** ``exp_avg`` holds the int8 codes of m, ``exp_avg_sq`` the uint8 codes of v,
both shaped and laid out like the parameter; ``exp_avg_scale`` and ``exp_avg_sq_scale`` hold
the float32 scales, one per block, ``ceil(numel / 256)`` of them. Loading casts: a float32 or
bfloat16 checkpoint into an int8 optimizer is quantized (to the nearest code), an int8 one
into another optimizer decoded. ``amsgrad`` is refused with int8 state (its running maximum
would need a third code, and a maximum of rounded values is biased upward).

Memory per parameter, float32 θ and g included: 10 bytes (+ 8/256 for the scales), against 16
with float32 state and 12 with bfloat16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from decoupled.optim._compact import in_memory_order, rounding_bits
from decoupled.optim._loaded_state import check_like_param, refuse

BLOCK = 256  # elements per scale: a fixed constant of the format
INT8 = torch.int8
SCALE_SUFFIX = "_scale"
# key -> (code dtype, largest code, power of the square law on |value|/scale)
_CODES = {"exp_avg": (torch.int8, 127, 2), "exp_avg_sq": (torch.uint8, 255, 4)}
# c of the decode: 1/levels² rounded to float32 (the C++ kernel's 1.0f / 16129.0f; through a
# double here, which rounds to the same float for both: tested)
_UNIT = {
    key: torch.tensor(1 / largest**2, dtype=torch.float32)
    for key, (_, largest, _) in _CODES.items()
}
# the scale factors k are kept in [FLT_MIN, 2¹²⁷] before they are rounded up (see encode_)
_K_RANGE = (torch.finfo(torch.float32).tiny, 2.0**127)


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _padded(flat: Tensor) -> Tensor:
    """``flat`` zero-padded to whole blocks, as (blocks, BLOCK)."""
    pad = blocks(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def levels(codes: Tensor, key: str) -> Tensor:
    """The decoded value of code ``q`` (any integer dtype) for a scale of 1, as ``decode``
    computes it: ``(q·|q|)·c_m`` for m and ``((q·q)·c_v)²`` for v, ``c = 1/levels²`` rounded
    to float32 (``q·|q|`` and ``q·q`` are exact). 1 exactly at the largest code (tested); the
    tests place values on and between these levels."""
    q = codes.to(torch.float32)
    if key == "exp_avg":
        return (q * q.abs()) * _UNIT[key]
    unit = (q * q) * _UNIT[key]
    return unit * unit


def decode(codes: Tensor, scale: Tensor, key: str) -> Tensor:
    """The float32 values of the codes of moment ``key`` (``exp_avg`` or ``exp_avg_sq``),
    shaped and laid out like ``codes``: ``levels(q)·s``."""
    flat = in_memory_order(codes)
    values = (levels(_padded(flat), key) * scale.view(-1, 1)).view(-1)[: flat.numel()]
    out = torch.empty_like(codes, dtype=torch.float32)
    in_memory_order(out).copy_(values)
    return out


def sqrt_rn(x: Tensor) -> Tensor:
    """IEEE float32 square root (correctly rounded), as the C++ and Triton kernels compute it:
    torch's float32 ``sqrt`` on the CPU is an approximation (about one result in six is an
    ulp off in torch 2.13), a float64 root rounded to float32 is exact."""
    return x.double().sqrt().float()


def rounded_up(x: Tensor) -> Tensor:
    """The scale factor k of ``encode_``: ``x`` kept in [FLT_MIN, 2¹²⁷], then the next float32
    above it (its bit pattern plus one), so that the largest magnitude times k is at least the
    largest level (unless x was kept at 2¹²⁷), and k never 0 (∞·0 would be NaN) nor ∞ (0·∞)."""
    return x.clamp(*_K_RANGE).view(torch.int32).add(1).view(torch.float32)


def encode_(codes: Tensor, scale: Tensor, value: Tensor, key: str, random16: Tensor) -> None:
    """Write ``value`` (float, shaped and laid out like ``codes``) into ``codes`` and
    ``scale`` with the rounding of the module docstring; ``random16[i]`` (in [0, 2¹⁶)) decides
    for the i-th element in memory order. A NaN makes its block's scale NaN and its codes 0 (the
    block decodes to NaN: the moment stays NaN, as in float32); an infinite value makes the
    scale infinite and its element the largest code; the finite ones code 0 (for m below
    about 10³³, above which they code 1 or 2 and decode to ±∞).

    In float32, per block: ``s``, the largest magnitude (1 where that is 0 or NaN), and
    ``k_m = up(127²/s)`` or ``k_v = up(255²/√s)`` (``rounded_up``). Per element of m:
    ``y = min(|m|·k_m, 127²)``, ``q = ⌊√y⌋``, and the code ``q + 1`` where
    ``y − q·q > t·(q + q + 1)``, else ``q``, with m's sign. Per element of v:
    ``f = min(√v·k_v, 255²)``, ``q = ⌊√f⌋``, ``q² = q·q``, ``o = q + q + 1``, and ``q + 1`` where
    ``(f − q²)·(f + q²) > t·(o·((q² + q²) + o))``: ``f² − q⁴`` against the gap
    ``(q + 1)⁴ − q⁴``, as products of sums (a product that feeds a sum is exact, so a compiler
    that fuses it into a multiply-add changes nothing). ``t = (r + 0.5)/2¹⁶``; roots correctly
    rounded.
    Up to rounding, the code is unbiased (``E[decode] = value``); where y lies within float32
    rounding of a level, q may be one off, and the comparison then keeps the nearer level.
    The largest element reaches the largest level exactly (k rounded up, then the minimum),
    so it is coded exactly. The kernels compute these operations in this order, so they write
    the same codes.

    Where ``127²/s`` exceeds 2¹²⁷ (a block of m whose largest magnitude is below 10⁻³⁴), k_m
    is kept at 2¹²⁷ and the codes come out low (biased toward 0); such m cannot move θ."""
    _, largest, _ = _CODES[key]
    flat = in_memory_order(value.float())
    magnitude = _padded(flat.abs())
    block_scale = magnitude.amax(dim=1)
    block_scale = torch.where(magnitude.isnan().any(dim=1), float("nan"), block_scale)
    safe = torch.where(block_scale > 0, block_scale, 1.0).view(-1, 1)
    # a tensor numerator: torch computes a number over a tensor as a reciprocal times the
    # number, two roundings
    top = torch.tensor(float(largest * largest), device=safe.device)
    threshold = _padded((random16.to(torch.float32) + 0.5) * (1 / 65536))
    if key == "exp_avg":
        y = torch.minimum(magnitude * rounded_up(top / safe), top)
        low = torch.floor(sqrt_rn(y))
        gap = y - low * low
        step = low + low + 1
    else:
        f = torch.minimum(sqrt_rn(magnitude) * rounded_up(top / sqrt_rn(safe)), top)
        low = torch.floor(sqrt_rn(f))
        square, odd = low * low, low + low + 1
        gap = (f - square) * (f + square)  # f² − q⁴
        step = odd * ((square + square) + odd)  # (q + 1)⁴ − q⁴
    code = low + (gap > threshold * step)
    code = torch.where(block_scale.isnan().view(-1, 1), 0, code).view(-1)[: flat.numel()]
    code = torch.where(flat < 0, -code, code)
    in_memory_order(codes).copy_(code.to(codes.dtype))
    scale.copy_(block_scale)


def new_moments(param: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Zero codes (laid out like ``param``) and zero scales for each moment in ``keys``."""
    state = {}
    for key in keys:
        state[key] = torch.zeros_like(param, dtype=_CODES[key][0])
        state[key + SCALE_SUFFIX] = torch.zeros(blocks(param.numel()), device=param.device)
    return state


def is_coded(state: dict, key: str) -> bool:
    return key + SCALE_SUFFIX in state


def recast_moments_(state: dict, keys: tuple[str, ...], dtype: torch.dtype) -> None:
    """Convert the moments ``keys`` of a loaded (or re-configured) ``state`` to ``dtype``
    (``INT8``: codes and scales, quantized to the nearest code; else a float dtype), decoding
    coded moments first. Coded moments that torch's ``load_state_dict`` cast to θ's dtype are
    whole numbers, decoded alike."""
    for key in keys:
        if key not in state:
            continue
        value = state[key]
        if is_coded(state, key):
            value = decode(value, state.pop(key + SCALE_SUFFIX), key)
        if dtype == INT8:
            coded = new_moments(value, (key,))
            nearest = torch.full((value.numel(),), 0x7FFF, dtype=torch.int64, device=value.device)
            encode_(coded[key], coded[key + SCALE_SUFFIX], value, key, nearest)
            state.update(coded)
        else:
            state[key] = value.to(dtype)


class Int8Moments:
    """The moments of one tensor for one reference step: float values decoded from their
    codes, written back by :meth:`store` (the counterpart of ``_compact.CompactMoments``)."""

    def __init__(self, state: dict, dtype: torch.dtype):
        self.state = state
        self.values = [decode(state[k], state[k + SCALE_SUFFIX], k).to(dtype) for k in _CODES]

    @torch.compiler.disable
    def store(self, step: float | Tensor, position: int) -> None:
        codes = self.state["exp_avg"]
        bits = rounding_bits(codes.numel(), step, position, codes.device)
        # the bfloat16 path's split of one hash: m the low 16 bits, v the high 16
        for key, value, random16 in zip(_CODES, self.values, (bits & 0xFFFF, bits >> 16)):
            encode_(self.state[key], self.state[key + SCALE_SUFFIX], value, key, random16)


def check_coded(where: str, key: str, state: dict, param: Tensor) -> None:
    """A loaded coded moment: codes of the parameter's shape and of the key's code dtype;
    scales one per block, finite and ``>= 0``."""
    codes, scale = state[key], state[key + SCALE_SUFFIX]
    if not isinstance(codes, Tensor):
        refuse(where, key, type(codes).__name__, "must be a tensor")
    if codes.shape != param.shape:
        refuse(where, f"{key} shape", tuple(codes.shape), f"must be {tuple(param.shape)}")
    dtype, levels, _ = _CODES[key]
    if codes.dtype != dtype:
        refuse(where, f"{key} dtype", codes.dtype, f"must be {dtype} (8-bit codes)")
    if key == "exp_avg" and bool((codes == -128).any()):
        refuse(where, key, -128, "codes of m must be in [-127, 127]")
    expected = (blocks(param.numel()),)
    if not isinstance(scale, Tensor) or tuple(scale.shape) != expected:
        shown = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        refuse(where, f"{key}{SCALE_SUFFIX} shape", shown, f"must be {expected}, one per block")
    check_like_param(where, key + SCALE_SUFFIX, scale, scale, nonnegative=True)


__all__ = ["BLOCK", "INT8", "Int8Moments", "decode", "encode_", "new_moments"]
