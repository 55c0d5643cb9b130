r"""The smallest storage in the Triton kernels: compensated bfloat16/float16 θ, int8 moments.

Compensated θ (``_compensated.py``): the master weight ``w = θ + r·ulp(θ)/256`` is loaded
(exact in float32: θ's 8 or 11 significant bits and r's 8 fit in 24), stepped in float32 like
a float32 parameter, and stored as ``θ ← round_to_nearest_even(w)`` and
``r ← clamp(floor((w − θ)/unit + (bits + ½)/2¹⁶), −128, 127)`` (0 where w is not finite),
``unit = ulp(θ)/256 = 2^{e−p−8}`` with ``θ = m·2^e``, ``m ∈ [0.5, 1)``, e at least the
exponent of the dtype's smallest normal, p = 8 (bfloat16) or 11 (float16). Every operation
is the reference's in float32 and each is exact except the one addition of the rounding
offset, which both round alike, so θ and r equal the reference's whenever w does.

bfloat16 is converted with integer operations (``(bits + 0x7FFF + lsb) >> 16``, NaN as
0x7FC0, c10's rounding) rather than ``.to(tl.bfloat16)``: the Triton interpreter truncates
that cast, and ``r`` is only right beside a correctly rounded θ.

int8 moments (``_int8.py``): a moment is decoded per element from its code and its block's
scale, ``sign(q)·L(|q|)·s``, L(c) the float32 with bit pattern (c + bias)·2²⁰ for c >= 8, else
c·T/8; after the step each program, which owns whole blocks of 256 elements, takes each
block's largest magnitude (a maximum over the bit patterns, which puts NaN above inf), its
power-of-two scale, and codes every element with ``_int8.encode_``'s operations in its order:
the product by the inverse scale (exact), ``x + T`` below the first binade, the random bits
added to the bit pattern and the cut, so codes and scales are the reference's bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exponent_unit(theta, TINY_EXPONENT: tl.constexpr, PRECISION: tl.constexpr):
    """ulp(θ)/256 = 2^(e − p − 8) as float32 (``_compensated._unit``): e is frexp's exponent
    of θ, raised to that of the smallest normal (zero and subnormals); the result, down to
    2⁻¹⁴¹ for bfloat16, may itself be a float32 subnormal, hence its two encodings."""
    biased = ((theta.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    power = tl.maximum(biased - 126, TINY_EXPONENT) - (PRECISION + 8)
    normal = (tl.maximum(power, -126) + 127) << 23
    subnormal = 1 << tl.minimum(tl.maximum(power + 149, 0), 22)
    return tl.where(power >= -126, normal, subnormal).to(tl.float32, bitcast=True)


@triton.jit
def _unit(theta, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        return _exponent_unit(theta, -125, 8)
    return _exponent_unit(theta, -13, 11)  # float16


@triton.jit
def load_master(p_ptr, r_ptr, idx, mask, DTYPE: tl.constexpr):
    """The float32 master weight θ + r·unit of compensated θ."""
    if DTYPE == tl.bfloat16:
        bits = tl.load(p_ptr.to(tl.pointer_type(tl.uint16)) + idx, mask=mask, other=0)
        theta = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        theta = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    remainder = tl.load(r_ptr + idx, mask=mask, other=0).to(tl.float32)
    return theta + remainder * _unit(theta, DTYPE)


@triton.jit
def store_master(p_ptr, r_ptr, idx, weight, mask, random16, DTYPE: tl.constexpr):
    """Store the float32 master ``weight``: θ rounded to nearest even, r what rounding
    removed in units of ulp(θ)/256, rounded stochastically with the 16 bits ``random16``."""
    if DTYPE == tl.bfloat16:
        word = weight.to(tl.uint32, bitcast=True)
        rounded = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
        rounded = tl.where(weight != weight, 0x7FC0, rounded).to(tl.uint16)
        tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + idx, rounded, mask=mask)
        theta = (rounded.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        stored = weight.to(tl.float16)
        tl.store(p_ptr + idx, stored, mask=mask)
        theta = stored.to(tl.float32)
    offset = (random16.to(tl.float32) + 0.5) * (1.0 / 65536)
    lost = tl.div_rn(weight - theta, _unit(theta, DTYPE))  # exact: a power of two
    remainder = tl.minimum(tl.maximum(tl.floor(lost + offset), -128.0), 127.0)
    finite = tl.abs(weight) < float("inf")
    tl.store(r_ptr + idx, tl.where(finite, remainder, 0.0).to(tl.int8), mask=mask)


@triton.jit
def load_int8(codes_ptr, scales_ptr, idx, mask, BIAS: tl.constexpr, TINY: tl.constexpr):
    """A moment decoded from its codes (``_int8.decode``): sign(q)·L(|q|)·s, s the block's
    scale."""
    code = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + idx // 256, mask=mask, other=0.0)
    size = tl.abs(code)
    normal = ((size + BIAS) << 20).to(tl.float32, bitcast=True)
    magnitude = tl.where(size < 8, size.to(tl.float32) * (TINY / 8), normal)
    return tl.where(code < 0, -magnitude, magnitude) * scale


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


# tl.max's combine function, passed to tl.reduce directly: tl.max itself cannot run under the
# interpreter when triton was imported before TRITON_INTERPRET=1 was set (its own functions
# are then compiled ones), and the interpreter reduces with numpy only for this function
# (any other combine function is called element by element, far slower)
_MAXIMUM = getattr(tl.standard, "_elementwise_max", _larger)


@triton.jit
def _block_largest(magnitude, BLOCKS: tl.constexpr):
    """Each block's largest magnitude, NaN when any is NaN: the largest of their bit patterns,
    sign cleared (``abs`` of a NaN may keep it), which order non-negative floats and put a NaN
    above +inf."""
    bits = tl.reshape(magnitude.to(tl.int32, bitcast=True) & 0x7FFFFFFF, (BLOCKS, 256))
    largest = tl.reduce(bits, 1, _MAXIMUM).to(tl.float32, bitcast=True)
    return tl.where(largest != largest, float("nan"), largest)


@triton.jit
def _scale_of(largest):
    """``_int8.scales_of``: the least power of two at or above the largest magnitude (2⁻¹²⁶ for
    a subnormal one, 0 for 0); NaN for NaN, ∞ for a largest of 2¹²⁶ or more."""
    bits = largest.to(tl.int32, bitcast=True)
    power = ((bits & 0x7F800000) + (1 << 23)).to(tl.float32, bitcast=True)
    power = tl.where(((bits & 0x007FFFFF) == 0) & (bits >= 0x00800000), largest, power)
    scale = tl.where(bits == 0, 0.0, power)
    scale = tl.where(bits >= 0x7E800000, float("inf"), scale)
    return tl.where(largest != largest, largest, scale)


@triton.jit
def _per_element(block_values, BLOCKS: tl.constexpr):
    return tl.reshape(
        tl.broadcast_to(tl.expand_dims(block_values, 1), (BLOCKS, 256)), (BLOCKS * 256,)
    )


@triton.jit
def store_int8(codes_ptr, scales_ptr, first, idx, value, mask, live, random16,
               BIAS: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Code a moment with ``_int8.encode_``'s operations in its order: per block of 256 the
    scale s (stored where ``live``: the block is in the tensor and the step not skipped) and
    1/s (1 where s is 0 or not finite); per element x = |value|·(1/s), below T x' = x + T and
    b = bias + 8, else x' = x and b = bias, and the code ((bits(x') + 16·random16 + 8) >> 20)
    − b, with the value's sign; every code of a block whose scale is not finite 0."""
    BLOCKS: tl.constexpr = BLOCK // 256
    magnitude = tl.where(mask, tl.abs(value), 0.0)
    scale = _scale_of(_block_largest(magnitude, BLOCKS))
    tl.store(scales_ptr + first // 256 + tl.arange(0, BLOCKS), scale, mask=live)

    finite = scale < float("inf")  # NaN compares false
    usable = finite & (scale > 0)
    inverse = _per_element(tl.where(usable, tl.div_rn(1.0, tl.where(usable, scale, 1.0)), 1.0),
                           BLOCKS)  # fmt: skip
    x = magnitude * inverse
    linear = x < TINY
    bits = tl.where(linear, x + TINY, x).to(tl.int32, bitcast=True)
    noise = random16.to(tl.int32) * 16 + 8
    code = ((bits + noise) >> 20) - tl.where(linear, BIAS + 8, BIAS)
    code = tl.where(_per_element(finite, BLOCKS), code, 0)
    code = tl.where(value < 0, -code, code)
    tl.store(codes_ptr + idx, code.to(codes_ptr.dtype.element_ty), mask=mask)
