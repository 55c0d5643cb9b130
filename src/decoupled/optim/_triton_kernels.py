"""One-pass Triton kernels for Adam/AdamW and SGD/SGDW over a whole parameter group.

The arithmetic is the reference loops' (``adam_update``, ``sgd_update``) and the C++
kernel's (``csrc/adam.cpp``), element by element in float32, whatever θ's dtype (float32,
bfloat16 or float16 θ is read, computed on in float32 and rounded once when stored). IEEE
division and square root (``div_rn``, ``sqrt_rn``) and the C++ kernel's fused multiply-adds
keep float32 steps within an ulp or two of the reference; ``_kernels.py`` says where and why
paths round differently. The launcher compiles the kernels with ``enable_fp_fusion=False``:
Triton otherwise lets the GPU compiler fuse any product into a following sum, rounding once
where the reference rounds twice (a decoded moment's last product feeds ``g − m`` in lerp),
so the only multiply-adds are the explicit ``tl.fma`` of torch's own fused operations.

Multi-tensor launch (as torch's ``multi_tensor_apply``): the launcher (``_triton.py``) gives
a *tensor table*, one row of ``TABLE_COLUMNS`` int64 per tensor of the group (the addresses
of θ, g, the state and the step counter, the element count and the tensor's position in the
optimizer), and a *chunk table*, one (row, first element) pair per block of ``BLOCK``
elements. Program ``i`` updates chunk ``i``: one grid for the whole group.

Nothing is read on the host: the step counts (already incremented by the launcher), lr, the
decay rate c, GradScaler's scale and the skip flag of ``skip_nonfinite`` may all be device
tensors (``*_ptr`` arguments, selected by constexpr switches), so a launch never waits for
the device and can be captured in a CUDA graph. The bias corrections ``1 − β1ᵗ`` and
``sqrt(1 − β2ᵗ)`` arrive per tensor in float64 (computed on the device by the launcher, as
the reference computes them in double precision on the host), and numbers arrive as two
float32 halves (hi + lo), since a scalar argument is float32.

Stochastic rounding of bfloat16 moments uses the hash of ``_compact.py`` and the C++ kernel:
key = lowbias32(uint32(t)·0x9E3779B9 ^ uint32(position)·0x85EBCA6B), bits =
lowbias32(element ^ key), m takes the low 16 bits, v the high 16, max(v) lowbias32(bits) &
0xFFFF; the rounded value is ``(bits(x) + r) >> 16``, NaN stored as 0x7FC0.

Compensated bfloat16/float16 θ (``_compensated.py``) is the constexpr ``COMPENSATE``: the
step runs on the float32 master weight θ + r·ulp(θ)/256, loaded and stored by
``_triton_compact.py`` (r's 16 random bits: lowbias32(bits) >> 16), and bfloat16 moments are
then rounded stochastically, as the reference loop rounds them beside a float32 master.
int8 moments are the constexpr ``CODED``: m and v decoded before the step and coded after it
(``_triton_compact.py``, m with the low 16 bits, v the high 16), each program owning whole
blocks of 256 elements (the launcher's chunks are then multiples of 256).

Cautious weight decay (Chen, Li, Liang et al., arXiv 2510.12402) is the constexpr
``CAUTIOUS``: the decoupled decay applies where u and θ − θ₀ agree in sign (zero agrees, a
NaN does not), u being the update direction (Adam: m_t; SGD: the buffer b_t, g + μ·b_t with
Nesterov, g without momentum).
"""

from __future__ import annotations

import triton
import triton.language as tl

from decoupled.optim._int8 import CODES
from decoupled.optim._triton_compact import load_int8, load_master, store_int8, store_master

#: Columns of the tensor table: addresses of θ, g, m (or the momentum buffer), v, max(v), θ₀,
#: the step counter (for SGD: the tensor's position in the optimizer), then the element count
#: and the tensor's position in the optimizer (its stochastic-rounding key, the update's
#: ``first_position`` + its index in the list; for SGD: 1 where the
#: momentum buffer is fresh), then the address of compensated θ's remainder and those of
#: int8 moments' scales (``_triton_compact.py``).
THETA, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, REFERENCE, STEP, NUMEL, POSITION = range(9)
REMAINDER, EXP_AVG_SCALE, EXP_AVG_SQ_SCALE = 9, 10, 11
# the 8-bit floats of int8 moments (``_int8.CODES``)
M_BIAS, M_TINY = tl.constexpr(CODES["exp_avg"].bias), tl.constexpr(CODES["exp_avg"].tiny)
V_BIAS, V_TINY = tl.constexpr(CODES["exp_avg_sq"].bias), tl.constexpr(CODES["exp_avg_sq"].tiny)
TABLE_COLUMNS = tl.constexpr(12)

#: Decay modes (constexpr ``DECAY``).
NO_DECAY, L2_DECAY, DECOUPLED_DECAY = 0, 1, 2


@triton.jit
def _mix(x):
    """lowbias32 (Chris Wellons, hash-prospector) on uint32 lanes: products wrap mod 2³²."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _lerp(a, b, w):
    """torch's vectorized lerp (ATen/native/Lerp.h): a + w·(b − a) for |w| < 0.5, else
    b + (w − 1)·(b − a), each with one fused multiply-add (as the C++ kernel)."""
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, b - a, a), tl.fma(w - 1.0, b - a, b))


@triton.jit
def _agree(direction, offset):
    """Cautious decay's test (``decay.cautious_mask``): the signs agree, zero agrees with
    either, a NaN with none; signs, not the product, which could round to ±0."""
    return ((direction >= 0) & (offset >= 0)) | ((direction <= 0) & (offset <= 0))


@triton.jit
def _address(row, column: tl.constexpr, dtype: tl.constexpr):
    return tl.load(row + column).to(tl.pointer_type(dtype))


@triton.jit
def _load_state(ptr, idx, mask, ROUND: tl.constexpr):
    """A moment as float32; with ``ROUND`` it is bfloat16 stored as uint16 bits."""
    if ROUND:
        bits = tl.load(ptr + idx, mask=mask, other=0).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, idx, value, mask, random16, ROUND: tl.constexpr):
    """Store a float32 moment: rounded stochastically into bfloat16 bits with ``ROUND``, else
    rounded to nearest in the pointer's dtype."""
    if ROUND:
        word = value.to(tl.uint32, bitcast=True)
        rounded = ((word + random16) >> 16).to(tl.uint16)
        rounded = tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)  # NaN stays NaN
        tl.store(ptr + idx, rounded, mask=mask)
    else:
        tl.store(ptr + idx, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scalar(hi, lo, ptr, IS_TENSOR: tl.constexpr):
    """A hyperparameter in float64: read from a device tensor, or the number passed as two
    float32 halves (hi + lo: a scalar argument arrives as float32)."""
    if IS_TENSOR:
        return tl.load(ptr).to(tl.float64)
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _chunk(chunks_ptr, table_ptr, skip_ptr, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor row, element indices and mask (false everywhere when the
    skip flag of ``skip_nonfinite`` or GradScaler's found_inf is set)."""
    pid = tl.program_id(0)
    tensor = tl.load(chunks_ptr + 2 * pid)
    first = tl.load(chunks_ptr + 2 * pid + 1)
    row = table_ptr + tensor * TABLE_COLUMNS
    idx = first + tl.arange(0, BLOCK)
    mask = idx < tl.load(row + 7)
    if SKIP:
        mask = mask & ((idx - idx) == tl.load(skip_ptr).to(tl.int64))
    return tensor, row, idx, mask


@triton.jit
def _gradient(row, idx, mask, scale_ptr, DTYPE: tl.constexpr, SCALE: tl.constexpr,
              MAXIMIZE: tl.constexpr):  # fmt: skip
    """g in float32, unscaled by GradScaler's scale and written back (as torch's fused
    kernels), negated to maximize."""
    g_ptr = _address(row, 1, DTYPE)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    if SCALE:
        g = tl.div_rn(g.to(tl.float32), tl.load(scale_ptr).to(tl.float32)).to(DTYPE)
        tl.store(g_ptr + idx, g, mask=mask)
    g = g.to(tl.float32)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _weight_and_decayed_gradient(row, p_ptr, idx, mask, g, weight_decay, DTYPE: tl.constexpr,
                                 COMPENSATE: tl.constexpr, REF: tl.constexpr,
                                 DECAY: tl.constexpr):  # fmt: skip
    """θ in float32 (a compensated θ's master weight, ``load_master``), θ₀ (θ itself without
    ``REF``), and g with L2's λ·(θ − θ₀) added (``DECAY == 1``: Adam, SGD): what every step
    does before its moments, as the C++ kernel's ``apply_decay`` for L2."""
    if COMPENSATE:
        param = load_master(p_ptr, _address(row, 9, tl.int8), idx, mask, DTYPE)
    else:
        param = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    ref = param
    if REF:
        ref = tl.load(_address(row, 5, DTYPE) + idx, mask=mask, other=0.0).to(tl.float32)
    if DECAY == 1:  # L2: g ← g + λ·(θ − θ₀)
        offset = param - ref if REF else param
        g = tl.fma(weight_decay, offset, g)
    return param, ref, g


@triton.jit
def _decayed(param, ref, rate, REF: tl.constexpr):
    """θ after decoupled decay (``decay.apply_decoupled_decay_``): θ − c·(θ − θ₀) as
    lerp(θ, θ₀, c), or θ·(1 − c) toward zero, 1 − c rounded once from float64 as torch rounds
    a Python number."""
    if REF:
        return _lerp(param, ref, rate.to(tl.float32))
    return param * (1.0 - rate).to(tl.float32)


@triton.jit
def adam_kernel(
    chunks_ptr, table_ptr,
    lr, lr_lo, lr_ptr, rate, rate_lo, rate_ptr, scale_ptr, skip_ptr,
    corrections_ptr, beta1, beta2,
    eps, weight_decay,
    DTYPE: tl.constexpr, STATE: tl.constexpr, ROUND: tl.constexpr, DECAY: tl.constexpr,
    REF: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr,
    LR_TENSOR: tl.constexpr, RATE_TENSOR: tl.constexpr, SCALE: tl.constexpr,
    SKIP: tl.constexpr, COMPENSATE: tl.constexpr, CODED: tl.constexpr, BLOCK: tl.constexpr,
    LR_F32: tl.constexpr,
):  # fmt: skip
    """One Adam/AdamW step on one chunk (the algorithm box of ``decoupled.Adam``); with
    ``COMPENSATE`` on the float32 master weight of bfloat16/float16 θ and its remainder; with
    ``CODED`` on int8 moments, the chunk being whole blocks of 256."""
    tensor, row, idx, mask = _chunk(chunks_ptr, table_ptr, skip_ptr, SKIP, BLOCK)
    p_ptr = _address(row, 0, DTYPE)
    m_ptr = _address(row, 2, STATE)
    v_ptr = _address(row, 3, STATE)
    step = tl.load(_address(row, 6, tl.float32)).to(tl.float64)

    g = _gradient(row, idx, mask, scale_ptr, DTYPE, SCALE, MAXIMIZE)
    param, ref, g = _weight_and_decayed_gradient(
        row, p_ptr, idx, mask, g, weight_decay, DTYPE, COMPENSATE, REF, DECAY
    )

    if CODED:
        m_scales = _address(row, 10, tl.float32)
        v_scales = _address(row, 11, tl.float32)
        previous_m = load_int8(
            m_ptr.to(tl.pointer_type(tl.int8)), m_scales, idx, mask, M_BIAS, M_TINY
        )
        previous_v = load_int8(
            v_ptr.to(tl.pointer_type(tl.uint8)), v_scales, idx, mask, V_BIAS, V_TINY
        )
    else:
        previous_m = _load_state(m_ptr, idx, mask, ROUND)
        previous_v = _load_state(v_ptr, idx, mask, ROUND)
    exp_avg = _lerp(previous_m, g, 1.0 - beta1)
    exp_avg_sq = tl.fma((1.0 - beta2) * g, g, previous_v * beta2)
    second = exp_avg_sq
    key = _mix(step.to(tl.uint32) * 0x9E3779B9 ^ tl.load(row + 8).to(tl.uint32) * 0x85EBCA6B)
    random = _mix(idx.to(tl.uint32) ^ key)
    if AMSGRAD:
        vmax_ptr = _address(row, 4, STATE)
        previous = _load_state(vmax_ptr, idx, mask, ROUND)
        # torch.maximum: a NaN in either operand gives NaN
        keep = (previous > exp_avg_sq) | (previous != previous)
        second = tl.where(keep, previous, exp_avg_sq)
        _store_state(vmax_ptr, idx, second, mask, _mix(random) & 0xFFFF, ROUND)

    if DECAY == 2:  # AdamW: θ ← θ − c·(θ − θ₀), where cautious masking lets it
        c = _scalar(rate, rate_lo, rate_ptr, RATE_TENSOR)
        decayed = _decayed(param, ref, c, REF)
        if CAUTIOUS:  # u has the sign of m_t
            offset = param - ref if REF else param
            decayed = tl.where(_agree(exp_avg, offset), decayed, param)
        param = decayed

    lr64 = _scalar(lr, lr_lo, lr_ptr, LR_TENSOR)
    bias_correction1 = tl.load(corrections_ptr + 2 * tensor)  # 1 − β1ᵗ, float64
    bias_correction2_sqrt = tl.load(corrections_ptr + 2 * tensor + 1)  # float64
    if LR_F32:  # a tensor lr: torch's `lr / bias_correction1` divides float32 by float32
        neg_step_size = -tl.div_rn(lr64.to(tl.float32), bias_correction1.to(tl.float32))
    else:  # a number: rounded once, as the reference loop's Python float
        neg_step_size = (-(lr64 / bias_correction1)).to(tl.float32)
    if CODED:  # sqrt(v̂) as v's root times the float32 inverse (_int8.py, Arithmetic)
        denom = tl.sqrt_rn(second) * (1.0 / bias_correction2_sqrt).to(tl.float32) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt.to(tl.float32)) + eps
    param = param + tl.div_rn(neg_step_size * exp_avg, denom)

    if COMPENSATE:  # the remainder's bits: a rehash's high half (max(v) has its low half)
        store_master(p_ptr, _address(row, 9, tl.int8), idx, param, mask, _mix(random) >> 16, DTYPE)
    else:
        tl.store(p_ptr + idx, param.to(DTYPE), mask=mask)
    if CODED:  # m takes the low 16 bits, v the high 16, as bfloat16 moments
        first = tl.load(chunks_ptr + 2 * tl.program_id(0) + 1)
        live = first + tl.arange(0, BLOCK // 256) * 256 < tl.load(row + 7)  # blocks in θ
        if SKIP:  # as _chunk's mask: blocks live only where the skip flag is 0
            live = live & ((live.to(tl.int64) * 0) == tl.load(skip_ptr).to(tl.int64))
        store_int8(m_ptr.to(tl.pointer_type(tl.int8)), m_scales, first, idx, exp_avg, mask,
                   live, random & 0xFFFF, M_BIAS, M_TINY, BLOCK)  # fmt: skip
        store_int8(v_ptr.to(tl.pointer_type(tl.uint8)), v_scales, first, idx, exp_avg_sq, mask,
                   live, random >> 16, V_BIAS, V_TINY, BLOCK)  # fmt: skip
    else:
        _store_state(m_ptr, idx, exp_avg, mask, random & 0xFFFF, ROUND)
        _store_state(v_ptr, idx, exp_avg_sq, mask, random >> 16, ROUND)


@triton.jit
def sgd_kernel(
    chunks_ptr, table_ptr,
    lr, lr_lo, lr_ptr, rate, rate_lo, rate_ptr, scale_ptr, skip_ptr,
    momentum, dampening, weight_decay, step_count,
    DTYPE: tl.constexpr, BUFFER: tl.constexpr, DECAY: tl.constexpr, REF: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    CAUTIOUS: tl.constexpr, LR_TENSOR: tl.constexpr, RATE_TENSOR: tl.constexpr,
    SCALE: tl.constexpr, SKIP: tl.constexpr, COMPENSATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One SGD/SGDW step on one chunk (the algorithm box of ``decoupled.SGD``). A fresh
    momentum buffer (the table's position column is 1) starts as b ← g, as torch's. With
    ``COMPENSATE`` on the float32 master weight of bfloat16/float16 θ, with a float32 buffer
    (``BUFFER``); the remainder's bits are keyed by the group's ``step_count`` and the
    tensor's position in the optimizer (the table's step column, unused otherwise by SGD)."""
    _, row, idx, mask = _chunk(chunks_ptr, table_ptr, skip_ptr, SKIP, BLOCK)
    p_ptr = _address(row, 0, DTYPE)
    g = _gradient(row, idx, mask, scale_ptr, DTYPE, SCALE, MAXIMIZE)
    param, ref, g = _weight_and_decayed_gradient(
        row, p_ptr, idx, mask, g, weight_decay, DTYPE, COMPENSATE, REF, DECAY
    )

    direction = g
    if MOMENTUM:
        b_ptr = _address(row, 2, BUFFER)
        fresh = tl.load(row + 8) != 0
        stale = mask & ((idx - idx) == tl.load(row + 8))  # a fresh buffer is not read
        previous = tl.load(b_ptr + idx, mask=stale, other=0.0).to(tl.float32)
        # b.mul_(μ).add_(g, alpha=1 − τ), or b ← g the first time
        b = tl.where(fresh, g, tl.fma(1.0 - dampening, g, previous * momentum))
        tl.store(b_ptr + idx, b.to(BUFFER), mask=mask)
        direction = tl.fma(momentum, b, g) if NESTEROV else b

    if DECAY == 2:  # SGDW: θ ← θ − c·(θ − θ₀), where cautious masking lets it
        c = _scalar(rate, rate_lo, rate_ptr, RATE_TENSOR)
        decayed = _decayed(param, ref, c, REF)
        if CAUTIOUS:
            offset = param - ref if REF else param
            decayed = tl.where(_agree(direction, offset), decayed, param)
        param = decayed

    neg_lr = (-_scalar(lr, lr_lo, lr_ptr, LR_TENSOR)).to(tl.float32)
    param = tl.fma(neg_lr, direction, param)
    if COMPENSATE:  # the bits of _compensated.store_: lowbias32(bits) >> 16
        position = tl.load(row + 6).to(tl.uint32)
        key = _mix(step_count.to(tl.uint32) * 0x9E3779B9 ^ position * 0x85EBCA6B)
        random = _mix(idx.to(tl.uint32) ^ key)
        store_master(p_ptr, _address(row, 9, tl.int8), idx, param, mask, _mix(random) >> 16, DTYPE)
    else:
        tl.store(p_ptr + idx, param.to(DTYPE), mask=mask)


@triton.jit
def stochastic_round_kernel(out_ptr, value_ptr, bits_ptr, n, BLOCK: tl.constexpr):
    """``_compact.stochastic_round_`` as the kernels do it (for tests): float32 values into
    bfloat16 bits (uint16 storage) with the 16 random bits given per element."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    value = tl.load(value_ptr + idx, mask=mask, other=0.0)
    random16 = tl.load(bits_ptr + idx, mask=mask, other=0).to(tl.uint32)
    _store_state(out_ptr, idx, value, mask, random16, True)
