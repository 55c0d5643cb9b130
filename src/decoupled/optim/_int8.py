r"""8-bit optimizer moments (``state_dtype="int8"``): blockwise 8-bit floats, one power-of-two
scale per block.

The elements of a tensor, in memory order (the kernels' element index), are cut into blocks
of ``BLOCK = 256``; each block keeps one float32 scale and one byte per element. The code is
a small floating-point number, so that small values keep their relative precision (the idea
of bitsandbytes' blockwise dynamic 8-bit optimizers, Dettmers et al. 2022, arXiv 2110.02861,
and of FP8 optimizer states, Peng et al. 2023, arXiv 2310.18313):

- m: int8, sign and magnitude ``c = |q|`` in [0, 127], an E4M3 float (4 exponent bits,
  3 fraction bits, like OCP's FP8 E4M3);
- v: uint8 ``c`` in [0, 255], an E5M3 float (5 exponent bits).

.. math::
   m = \operatorname{sign}(q)\,s_m\,L_m(|q|),\qquad v = s_v\,L_v(q),\qquad
   L(c) = \begin{cases} 2^{e-b}\,(1 + f/8) & c = 8e + f \ge 8 \\
                        2^{1-b}\,c/8 & c < 8 \end{cases}

with ``b = 15`` for m and ``31`` for v: ``L(c)`` for c ≥ 8 is the float32 whose bit pattern is
``(c + bias)·2²⁰`` (exponent field ``e + 127 − b``, fraction f in its top 3 bits; ``bias =
896`` for m, ``768`` for v), and below the first binade the levels are linear, as IEEE
subnormals. The scale ``s`` is the least power of two at or above the block's largest
magnitude (``2^{E+1}`` for ``2^E < max < 2^{E+1}``, max itself when it is a power of two), so
every ``|value|/s`` lies in [0, 1] and the largest in (1/2, 1]. m's levels span 14 binades,
from [1/2, 1) down to [2⁻¹⁴, 2⁻¹³), then 8 linear steps of ``2⁻¹⁷·s`` to 0; v's 30 binades,
then steps of ``2⁻³³·s``; the level 1 is the top code. The codes above ``L = 1`` (m: 121 to
127, v: 249 to 255) are never written. A block decoded and coded again keeps its values
exactly: its largest decoded value lies in [s/2, s], so its new scale is s (the same codes),
or s/2 where that value is s/2 (each code then names the same number one binade up).

Against a square-law or linear code, this spends the bits evenly on every binade: each step
is 1/16 to 1/8 of the value (3 fraction bits); and coding needs no root, division or table,
only the bit pattern of a float (integer additions and shifts), so that the C++ kernel's
coding is cheap on any vector ISA. The levels above the linear range are the same numbers
whatever the (power-of-two) scale, so a decoded value is coded again to itself even where its
block's scale has changed, unless it lies in the new linear range.

**Rounding.** A value between two neighbouring levels is stored as the upper one with
probability proportional to its distance from the lower (stochastic rounding, Gupta et al.
2015, arXiv 1502.02551): unbiased in value, ``E[decode] = x`` (up to the probability's
resolution, 2⁻¹⁶ of a step), so the moving averages do not stall on updates below a code
step, as for ``bfloat16`` state. It is the rounding of the
float ``x = |value|/s`` from 23 fraction bits to 3: 20 random bits are added to its bit
pattern below the kept ones and the sum is cut (a carry moves to the next level, or to the
next binade); below the first binade ``T = 2^{1−b}`` it rounds ``x + T`` alike, whose bits are
linear in x there. The random bits are ``16·r + 8``, r the 16 bits of the same hash as
bfloat16 state (``_compact.rounding_bits``: m the low 16 bits, v the high 16), so the
probability is resolved in steps of 2⁻¹⁶ and runs are reproducible.

**Arithmetic.** Every operation is exact in float32 but one: the addition ``x + T`` below the
first binade, rounded to nearest (to 2⁻³⁷ of the scale for m, 2⁻⁵³ for v). Products by the
scale and its inverse, powers of two, are exact (but where ``|value|/s`` is below the smallest
normal float32, 2⁻¹²⁶, far below any level, and the decoded values of a block whose largest is
itself subnormal). So every implementation (this module, the C++ and the Triton kernels)
writes the same codes from the same values.

**Error bound.** One rounding moves a value by less than one step, 1/8 of the lower end of
its binade:

.. math::
   |\tilde m - m| < \tfrac{1}{8}|m| + 2^{-17}s_m, \qquad
   |\tilde v - v| < \tfrac{1}{8}v + 2^{-33}s_v

(``s`` ≤ twice the block's largest, but 2⁻¹²⁶ for a subnormal largest). The errors of
successive steps are independent and of mean 0, so in the moving averages they add like a
random walk damped by β, and stay bounded (``tests/optim/test_int8_state.py`` runs 1000 steps
on a quadratic).

The update itself is computed in float32 from the decoded moments, as for bfloat16 state; only
what is stored is rounded. One operation differs from the float32 step: sqrt(v̂) is v's root
times the float32 inverse of ``sqrt(1 − β2ᵗ)`` (rounded once from float64), where torch
divides by it. It is at most one rounding apart, far below a code step, and saves a division
per element, the most expensive operation of a step that is bound by arithmetic, not memory:
the C++ step runs 7% faster on an AVX-512 Xeon (one 20M-element tensor, 2 threads).

**Edge cases.** A block whose largest magnitude is NaN, ∞, or 2¹²⁶ or more (the inverse of
its scale would be subnormal, flushed to 0 where denormals are flushed) keeps NaN or ∞ as its
scale and codes 0: it decodes to NaN (0·∞), so the moment stays NaN as in float32 (there, one
element; here, its block, and also for a finite largest that float32 would keep). A block of
zeros has scale 0.

**State dict.** ``exp_avg`` holds the int8 codes of m, ``exp_avg_sq`` the uint8 codes of v,
both shaped and laid out like the parameter; ``exp_avg_scale`` and ``exp_avg_sq_scale`` hold
the float32 scales, one per block, ``ceil(numel / 256)`` of them, each a power of two, 0 or
not finite. A loaded scale that is not a power of two or 0, or a code above the level 1 (m:
``|q|`` > 120, v: ``q`` > 248), is refused: it comes from another format (the square-law int8
codes of decoupled 0.4 and earlier coded each block's largest as 127 or 255, scaled by that
largest; ``upgrade_int8_state`` converts them). Loading casts: a float32 or bfloat16
checkpoint into an int8 optimizer is quantized (to the nearest code), an int8 one into another
optimizer decoded. ``amsgrad`` is refused with int8 state (its running maximum would need a
third code, and a maximum of rounded values is biased upward).

Memory per parameter, float32 θ and g included: 10 bytes (+ 8/256 for the scales), against 16
with float32 state and 12 with bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from decoupled.optim._compact import eager, in_memory_order, rounding_bits
from decoupled.optim._loaded_state import _local, check_like_param, refuse

BLOCK = 256  # elements per scale: a fixed constant of the format
INT8 = torch.int8
SCALE_SUFFIX = "_scale"
FRACTION_SHIFT = 20  # float32 fraction bits below the code's 3
_OLDER = (
    "int8 state saved by decoupled 0.4 or earlier (square-law codes) does not load as it is; "
    "convert it with decoupled.optim.upgrade_int8_state(state_dict)"
)
LARGEST_SCALED = 2.0**126  # blocks at or above it are not coded (their 1/s would be subnormal)


class Code:
    """One moment's 8-bit float: ``dtype`` of its codes, ``largest`` magnitude of a code, and
    the ``bias`` added to a code c >= 8 to make the bit pattern ``(c + bias)·2²⁰`` of its
    level; ``tiny``, the first binade's lower end ``T`` (the level of code 8), ``unit``, the
    linear levels' step ``T/8``, and ``top``, the code of level 1, the largest one written."""

    def __init__(self, dtype: torch.dtype, largest: int, bias: int):
        self.dtype, self.largest, self.bias = dtype, largest, bias
        first = torch.tensor((bias + 8) << FRACTION_SHIFT, dtype=torch.int32)
        self.tiny = float(first.view(torch.float32))
        self.unit = self.tiny / 8
        self.top = (0x3F800000 >> FRACTION_SHIFT) - bias

    def above_top(self, codes: Tensor) -> Tensor:
        """Where ``|q|`` exceeds ``top``: codes this format never writes (another format's)."""
        return codes.to(torch.int32).abs() > self.top


CODES = {"exp_avg": Code(torch.int8, 127, 896), "exp_avg_sq": Code(torch.uint8, 255, 768)}


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _padded(flat: Tensor) -> Tensor:
    """``flat`` zero-padded to whole blocks, as (blocks, BLOCK)."""
    pad = blocks(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def levels(codes: Tensor, key: str) -> Tensor:
    """The decoded value of code ``q`` (any integer dtype) for a scale of 1, as ``decode``
    computes it (``L(|q|)``, with q's sign for m): 0 at code 0, 8 linear steps, then 8 steps
    per binade; the tests place values on and between these levels."""
    code = CODES[key]
    c = codes.to(torch.int32)
    a = c.abs()
    normal = ((a + code.bias) << FRACTION_SHIFT).view(torch.float32)
    magnitude = torch.where(a < 8, a.to(torch.float32) * code.unit, normal)
    return torch.where(c < 0, -magnitude, magnitude)


def scales_of(largest: Tensor) -> Tensor:
    """The block scale, the least power of two at or above each block's largest magnitude:
    ``2^{E+1}`` for ``2^E < largest < 2^{E+1}``, the largest itself for a (normal) power of
    two, 2⁻¹²⁶ for a subnormal largest, 0 for 0; NaN for NaN, ∞ for a largest of 2¹²⁶ or more
    (∞ included), whose scale's inverse would be subnormal."""
    bits = largest.view(torch.int32)
    power = ((bits & 0x7F800000) + (1 << 23)).view(torch.float32)
    power = torch.where(((bits & 0x007FFFFF) == 0) & (bits >= 0x00800000), largest, power)
    scale = torch.where(bits == 0, 0.0, power)
    return torch.where(
        largest < LARGEST_SCALED, scale, torch.where(largest.isnan(), largest, torch.inf)
    )


def decode(codes: Tensor, scale: Tensor, key: str) -> Tensor:
    """The float32 values of the codes of moment ``key`` (``exp_avg`` or ``exp_avg_sq``),
    shaped and laid out like ``codes``: ``levels(q)·s``."""
    return _scaled_levels(codes, scale, lambda q: levels(q, key))


def _scaled_levels(codes: Tensor, scale: Tensor, level_of: Callable[[Tensor], Tensor]) -> Tensor:
    """``level_of(q)·s`` for every code, s its block's scale, shaped and laid out like
    ``codes`` (float32)."""
    flat = in_memory_order(codes)
    values = (level_of(_padded(flat)) * scale.view(-1, 1)).view(-1)[: flat.numel()]
    out = torch.empty_like(codes, dtype=torch.float32)
    in_memory_order(out).copy_(values)
    return out


def encode_(codes: Tensor, scale: Tensor, value: Tensor, key: str, random16: Tensor) -> None:
    """Write ``value`` (float, shaped and laid out like ``codes``) into ``codes`` and
    ``scale`` with the rounding of the module docstring; ``random16[i]`` (in [0, 2¹⁶)) decides
    for the i-th element in memory order.

    In float32, per block: the largest magnitude (NaN when any element is NaN), its scale
    ``s`` (``scales_of``) and ``1/s`` (1 where s is 0 or not finite). Per element:
    ``x = |value|·(1/s)``; below the first binade (``x < T``) ``x' = x + T`` and ``b = bias +
    8``, else ``x' = x`` and ``b = bias``; the code ``((bits(x') + 16·r + 8) >> 20) − b``, with
    the value's sign for m. Every code of a block whose scale is not finite is 0. The kernels
    compute these operations in this order, so they write the same codes."""
    code = CODES[key]
    flat = in_memory_order(value.float())
    magnitude = _padded(flat.abs())
    largest = magnitude.amax(dim=1)
    largest = torch.where(magnitude.isnan().any(dim=1), float("nan"), largest)
    block_scale = scales_of(largest)
    usable = (block_scale > 0) & block_scale.isfinite()
    inverse = torch.where(usable, 1 / torch.where(usable, block_scale, 1.0), 1.0).view(-1, 1)
    x = magnitude * inverse
    linear = x < code.tiny
    bits = torch.where(linear, x + code.tiny, x).view(torch.int32)
    noise = _padded(random16.to(torch.int32) * 16 + 8)
    c = ((bits + noise) >> FRACTION_SHIFT) - torch.where(linear, code.bias + 8, code.bias)
    c = torch.where(block_scale.isfinite().view(-1, 1), c, 0).view(-1)[: flat.numel()]
    c = torch.where(flat < 0, -c, c)
    in_memory_order(codes).copy_(c.to(codes.dtype))
    scale.copy_(block_scale)


def new_moments(param: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Zero codes (laid out like ``param``) and zero scales for each moment in ``keys``."""
    state = {}
    for key in keys:
        state[key] = torch.zeros_like(param, dtype=CODES[key].dtype)
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
        self.values = [decode(state[k], state[k + SCALE_SUFFIX], k).to(dtype) for k in CODES]

    @eager
    def store(self, step: float | Tensor, position: int) -> None:
        codes = self.state["exp_avg"]
        bits = rounding_bits(codes.numel(), step, position, codes.device)
        # the bfloat16 path's split of one hash: m the low 16 bits, v the high 16
        for key, value, random16 in zip(CODES, self.values, (bits & 0xFFFF, bits >> 16)):
            encode_(self.state[key], self.state[key + SCALE_SUFFIX], value, key, random16)


def upgrade_int8_state(state_dict: dict) -> int:
    """Convert, in place, the int8 moments of an optimizer state dict saved by decoupled 0.4 or
    earlier into this format, and return how many moments were converted.

    Those versions coded m as ``((q·|q|)·c)·s`` and v as ``((q·q·c)²)·s`` (``c = fl(1/127²)``,
    ``fl(1/255²)``; a square law on |m| and √v), with ``s`` the block's largest magnitude and
    the largest coded as 127 or 255. A moment is recognized as such by a code above this
    format's largest (m: |q| > 120, v: q > 248), which every block of it that is not all zero
    holds; it is decoded with that formula and coded again to the nearest level. Moments
    already in this format, and all-zero ones (the same in both), are left as they are::

        state = torch.load("optimizer.pt")
        decoupled.optim.upgrade_int8_state(state)
        optimizer.load_state_dict(state)
    """
    converted = 0
    for param_state in state_dict["state"].values():
        for key, code in CODES.items():
            if not is_coded(param_state, key):
                continue
            codes, scale = param_state[key], param_state[key + SCALE_SUFFIX]
            if not bool(code.above_top(codes).any()):
                continue
            del param_state[key + SCALE_SUFFIX]
            param_state[key] = _scaled_levels(
                codes, scale.float(), lambda q, key=key: _square_law_levels(q, key)
            )
            recast_moments_(param_state, (key,), INT8)
            converted += 1
    return converted


def _square_law_levels(codes: Tensor, key: str) -> Tensor:
    """decoupled 0.4's levels: ``(q·|q|)·c`` for m, ``((q·q)·c)²`` for v, ``c = fl(1/127²)``,
    ``fl(1/255²)``."""
    largest = CODES[key].largest
    unit = torch.tensor(1 / largest**2, dtype=torch.float32, device=codes.device)
    q = codes.to(torch.float32)
    if key == "exp_avg":
        return (q * q.abs()) * unit
    level = (q * q) * unit
    return level * level


def check_coded(where: str, key: str, state: dict, param: Tensor) -> None:
    """A loaded coded moment: codes of the parameter's shape and of the key's code dtype;
    scales one per block, finite, ``>= 0``, and each 0 or a power of two (``scales_of``), which
    also refuses the scales of another int8 format (a block's largest magnitude)."""
    codes, scale = state[key], state[key + SCALE_SUFFIX]
    if not isinstance(codes, Tensor):
        refuse(where, key, type(codes).__name__, "must be a tensor")
    if codes.shape != param.shape:
        refuse(where, f"{key} shape", tuple(codes.shape), f"must be {tuple(param.shape)}")
    dtype = CODES[key].dtype
    if codes.dtype != dtype:
        refuse(where, f"{key} dtype", codes.dtype, f"must be {dtype} (8-bit codes)")
    top = CODES[key].top
    beyond = CODES[key].above_top(codes)
    if bool(beyond.any()):
        shown = _local(codes)[_local(beyond)].flatten()[:1].tolist()
        value = shown[0] if shown else "a code (in another shard)"
        low = -top if key == "exp_avg" else 0
        refuse(where, key, value, f"codes must be in [{low}, {top}], the levels up to 1; {_OLDER}")
    expected = (blocks(param.numel()),)
    if not isinstance(scale, Tensor) or tuple(scale.shape) != expected:
        shown = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        refuse(where, f"{key}{SCALE_SUFFIX} shape", shown, f"must be {expected}, one per block")
    check_like_param(where, key + SCALE_SUFFIX, scale, scale, nonnegative=True)
    fraction = scale.float().view(torch.int32) & 0x7FFFFF
    if bool((fraction != 0).any()):
        shown = _local(scale)[_local(fraction != 0)].flatten()[:1].tolist()
        value = f"{shown[0]} (an element)" if shown else "an element (in another shard)"
        refuse(where, key + SCALE_SUFFIX, value, f"must be 0 or a power of two; {_OLDER}")


__all__ = [
    "BLOCK",
    "INT8",
    "Int8Moments",
    "decode",
    "encode_",
    "new_moments",
    "upgrade_int8_state",
]
