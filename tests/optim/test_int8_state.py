"""8-bit optimizer moments (``state_dtype="int8"``, ``_int8.py``): the code and its rounding,
one step against a float64 implementation of the formula, bounded error over 1000 steps,
memory, state dicts across state dtypes, damaged state refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _int8
from decoupled.optim._int8 import BLOCK, CODES, decode, encode_, levels, new_moments, scales_of

from .test_compact_state import quadratic_run

INT8 = {"state_dtype": "int8"}
# 4096-element tensors: on a busy machine each op's thread-pool handshake costs ten times the
# work (conftest.py's one_thread); one thread runs the 1000-step test in seconds
pytestmark = pytest.mark.usefixtures("one_thread")


def coded(value: torch.Tensor, key: str, bits: torch.Tensor):
    state = new_moments(value, (key,))
    encode_(state[key], state[key + "_scale"], value, key, bits)
    return state[key], state[key + "_scale"]


def uniform_bits(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << 16, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("key", "b"), [("exp_avg", 15), ("exp_avg_sq", 31)])
def test_levels_are_8_bit_floats_up_to_one(key, b):
    """L(c) = 2^(e−b)(1 + f/8) for c = 8e + f >= 8, 2^(1−b)·c/8 below (the module docstring's
    formula, in float64), exactly; strictly increasing, 8 linear steps then 8 per binade, each
    at most 1/8 of the level below it; 1 at code 8b (m: 120, v: 248); m's negative codes
    mirror the positive ones."""
    code = CODES[key]
    c = torch.arange(code.largest + 1)
    d = levels(c, key)
    e, f = (c // 8).double(), (c % 8).double()
    exact = torch.where(e > 0, 2 ** (e - b) * (1 + f / 8), 2.0 ** (1 - b) * f / 8)
    assert torch.equal(d.double(), exact)
    assert d[0] == 0 and d[8 * b] == 1 and bool((d[1:] > d[:-1]).all())
    assert bool((d[9:] - d[8:-1] <= d[8:-1] / 8).all())
    assert bool((d[1:9] - d[:8] == 2.0 ** (1 - b) / 8).all())
    if key == "exp_avg":
        assert torch.equal(levels(-c, key), -d)


def test_scales_are_the_least_power_of_two_at_or_above_the_largest():
    """The block scale is 2^(E+1) for a largest magnitude in (2^E, 2^(E+1)), the largest itself
    for a power of two: so every |value|/s is at most 1; subnormals take 2⁻¹²⁶, 0 keeps 0;
    from 2¹²⁶ on (whose 1/s would be subnormal) and for ∞ the scale is ∞, for NaN NaN."""
    below = torch.tensor(2.0**126).nextafter(torch.tensor(0.0)).item()
    largest = torch.tensor(
        [0.0, 1e-45, 0.75, 1.0, 1.5, 2.0**-126, below, 2.0**126, 3e38, math.inf, math.nan]
    )
    expected = [0.0, 2.0**-126, 1.0, 1.0, 2.0, 2.0**-126, 2.0**126, math.inf, math.inf,
                math.inf, math.nan]  # fmt: skip
    scales = scales_of(largest)
    assert scales[:-1].tolist() == expected[:-1] and scales[-1].isnan()


@pytest.mark.parametrize("top", ["level 1", "level 1/2"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_decoded_block_codes_again_to_the_same_values(key, top):
    """Its largest decoded value is s (the top code) or s/2: the scale stays s, or becomes
    s/2 with every value kept (a scale doubled on a top-coded block, as a rule taking the
    power of two strictly above would, loses the lowest binade)."""
    code = CODES[key]
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, code.top + 1, (2 * BLOCK,), generator=generator)
    codes[:BLOCK] = codes[:BLOCK].clamp(max=code.top - 8)  # first block: its top lower down
    codes[5] = code.top if top == "level 1" else code.top - 8
    codes[BLOCK + 7] = code.top
    if key == "exp_avg":
        codes[::3] = -codes[::3]
    codes = codes.to(code.dtype)
    scales = torch.tensor([2.0**-3, 2.0**5])
    values = decode(codes, scales, key)
    again, again_scales = coded(values, key, uniform_bits(codes.numel(), 1))
    assert torch.equal(decode(again, again_scales, key), values)
    expected = scales.clone()
    if top == "level 1/2":
        expected[0] /= 2
    assert torch.equal(again_scales, expected)
    if top == "level 1":
        assert torch.equal(again, codes)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_rounding_is_unbiased_within_one_code_step_and_exact_on_codes(key):
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(3 * BLOCK + 17, generator=generator) ** 3  # wide range, not whole blocks
    value[:BLOCK] *= torch.logspace(-12, 0, BLOCK)  # one block spanning 12 decades
    if key == "exp_avg_sq":
        value = value.abs()
    decoded = torch.stack(
        [decode(*coded(value, key, uniform_bits(value.numel(), seed)), key) for seed in range(400)]
    )
    codes, scale = coded(value, key, uniform_bits(value.numel(), 0))
    assert codes.dtype == CODES[key].dtype
    assert scale.shape == (4,)
    block_max = torch.nn.functional.pad(value.abs(), (0, 4 * BLOCK - value.numel()))
    block_max = block_max.view(4, BLOCK).amax(1)
    assert torch.equal(scale, 2.0 ** (block_max.log2().floor() + 1))
    scale = scale.repeat_interleave(BLOCK)[: value.numel()]
    # the module docstring's bound on one rounding
    floor = scale * CODES[key].unit
    bound = value.abs() / 8 + floor
    error = (decoded - value).abs()
    assert (error <= bound * (1 + 1e-5)).all()
    assert (decoded.std(0) > 0).sum() > value.numel() // 2  # rounding is random, not nearest
    # unbiased: one rounding's error, within one step (≤ bound), has a standard deviation of at
    # most bound/2, so the mean of 400 is within 5·(bound/2)/√400 (5 sigma)
    assert ((decoded.mean(0) - value).abs() <= 5 * bound / 40 + 1e-6 * floor).all()
    # a decoded value is coded exactly again, whatever the random bits, but in the linear range
    # of a block whose scale changed (its largest rounded up to the scale itself)
    for sample in decoded[:20]:
        again_codes, again_scale = coded(sample, key, uniform_bits(value.numel(), 9))
        again = decode(again_codes, again_scale, key)
        moved = again_scale != coded(value, key, uniform_bits(value.numel(), 0))[1]
        moved = moved.repeat_interleave(BLOCK)[: value.numel()]
        kept = ~moved | (sample.abs() >= again_scale.repeat_interleave(BLOCK)[: value.numel()]
                         * CODES[key].tiny)  # fmt: skip
        assert torch.equal(again[kept], sample[kept])


def float64_adam_step(theta, grad, m, v, step, lr, betas, eps, weight_decay, decoupled_):
    """Adam/AdamW's formula in float64 (the algorithm box), from decoded moments."""
    theta, grad, m, v = (t.double() for t in (theta, grad, m, v))
    if decoupled_:
        theta = theta * (1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * theta
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad * grad
    m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
    return theta - lr * m_hat / (v_hat.sqrt() + eps), m, v


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(7,), (300,), (16, 33), (2, 3, 5, 7)]),
    decoupled_=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    channels_last=st.booleans(),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_one_step_matches_the_float64_formula(
    shape, decoupled_, weight_decay, channels_last, steps, seed
):
    """From any coded state, a step equals the float64 formula on the decoded moments (θ to
    float32 rounding), and the stored moments are within one code step of the formula's."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(shape, generator=generator)
    if channels_last and len(shape) == 4:
        theta = theta.contiguous(memory_format=torch.channels_last)
    theta = torch.nn.Parameter(theta)
    cls = decoupled.AdamW if decoupled_ else decoupled.Adam
    optimizer = cls([theta], lr=1e-2, weight_decay=weight_decay, **INT8)
    for _ in range(steps):
        theta.grad = torch.randn(shape, generator=generator)
        state = optimizer.state[theta]
        if state:
            before = theta.detach().clone()
            m = decode(state["exp_avg"], state["exp_avg_scale"], "exp_avg")
            v = decode(state["exp_avg_sq"], state["exp_avg_sq_scale"], "exp_avg_sq")
            count = float(state["step"]) + 1
        else:
            before, m, v, count = theta.detach().clone(), *[torch.zeros(shape)] * 2, 1.0
        expected, m64, v64 = float64_adam_step(
            before, theta.grad, m, v, count, 1e-2, (0.9, 0.999), 1e-8, weight_decay, decoupled_
        )
        optimizer.step()
        state = optimizer.state[theta]
        assert state["exp_avg"].stride() == theta.stride()
        torch.testing.assert_close(theta.detach().double(), expected, rtol=1e-5, atol=1e-6)
        m_new = decode(state["exp_avg"], state["exp_avg_scale"], "exp_avg").double()
        v_new = decode(state["exp_avg_sq"], state["exp_avg_sq_scale"], "exp_avg_sq").double()
        scale_m, scale_v = 2 * m64.abs().max(), 2 * v64.max()  # at least the block scales
        assert ((m_new - m64).abs() <= m64.abs() / 8 + scale_m * (2**-17 + 1e-6)).all()
        assert ((v_new - v64).abs() <= v64 / 8 + scale_v * (2**-33 + 1e-6)).all()


def test_error_against_float32_state_stays_bounded_over_1000_steps():
    """Measured 2.2% of |θ₀| at most, 1.2% at the end: the blocks of this quadratic hold
    similar values, where 3 fraction bits err most (a square-law code, finer near the
    block's largest, drifts 0.7%); bfloat16 state 0.2%."""
    reference, _, _ = quadratic_run(None)
    compact, optimizer, theta = quadratic_run("int8")
    assert optimizer.state[theta]["exp_avg"].dtype == torch.int8
    error = (compact - reference).norm(dim=1) / reference[0].norm()
    assert error.max().item() < 3e-2
    assert error[-100:].max().item() < 2 * error[400:500].max().item() + 1e-3  # not growing


def test_state_memory_is_a_quarter_plus_the_scales():
    def state_bytes(**kwargs):
        theta = torch.nn.Parameter(torch.zeros(1000, 10))
        optimizer = decoupled.AdamW([theta], **kwargs)
        theta.grad = torch.ones_like(theta)
        optimizer.step()
        return sum(t.nbytes for k, t in optimizer.state[theta].items() if k != "step")

    assert state_bytes(**INT8) == 2 * 10_000 + 2 * 4 * 40  # codes + 40 scales per moment
    assert state_bytes() == 8 * 10_000


def test_state_dicts_load_across_state_dtypes():
    """int8 -> float32 -> bfloat16 -> int8 and through torch.optim: each load casts; a
    decoded int8 state is coded again to the same values (scales kept, or halved where a
    block's largest decoded to half its scale)."""
    _, optimizer, theta = quadratic_run("int8", steps=20)
    saved = copy.deepcopy(optimizer.state_dict())
    assert set(saved["state"][0]) == {
        "step", "exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale"
    }  # fmt: skip
    m = decode(saved["state"][0]["exp_avg"], saved["state"][0]["exp_avg_scale"], "exp_avg")
    back = decoupled.AdamW([theta], lr=1e-2, **INT8)
    back.load_state_dict(copy.deepcopy(saved))
    theta.grad = torch.zeros_like(theta)
    float32 = decoupled.AdamW([theta], lr=1e-2)
    float32.load_state_dict(copy.deepcopy(saved))
    float32._init_state(float32.param_groups[0], theta)
    assert float32.state[theta]["exp_avg"].dtype == torch.float32
    assert torch.equal(float32.state[theta]["exp_avg"], m)
    assert "exp_avg_scale" not in float32.state[theta]
    bf16 = decoupled.AdamW([theta], lr=1e-2, state_dtype=torch.bfloat16)
    bf16.load_state_dict(copy.deepcopy(saved))
    bf16._init_state(bf16.param_groups[0], theta)
    assert torch.equal(bf16.state[theta]["exp_avg"], m.bfloat16())
    again = decoupled.AdamW([theta], lr=1e-2, **INT8)
    again.load_state_dict(float32.state_dict())  # float32 -> int8: the same codes
    again._init_state(again.param_groups[0], theta)
    for key in ("exp_avg", "exp_avg_sq"):
        ours, theirs = again.state[theta], saved["state"][0]
        scale, saved_scale = ours[key + "_scale"], theirs[key + "_scale"]
        assert torch.equal(decode(ours[key], scale, key), decode(theirs[key], saved_scale, key))
        assert bool(((scale == saved_scale) | (scale == saved_scale / 2)).all()), key
    torch_optimizer = torch.optim.AdamW([theta], lr=1e-2)
    torch_optimizer.load_state_dict(float32.state_dict())
    torch_optimizer.step()  # a decoded int8 checkpoint steps in torch.optim
    back.step()
    assert back.state[theta]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize(
    "field,damage,message",
    [
        ("exp_avg_scale", lambda t: t.neg_(), "exp_avg_scale"),
        ("exp_avg_sq_scale", lambda t: t.fill_(float("nan")), "exp_avg_sq_scale"),
        # a block's largest magnitude, as the scales of a square-law int8 format were
        ("exp_avg_scale", lambda t: t.mul_(0.75), "must be 0 or a power of two"),
        ("exp_avg_scale", lambda t: t[:-1], "exp_avg_scale shape"),
        ("exp_avg", lambda t: t.to(torch.int16), "exp_avg dtype"),
        ("exp_avg", lambda t: t.fill_(-128), "exp_avg = -128"),
        # the largest code of the square-law int8 format, coded at every block's largest
        ("exp_avg_sq", lambda t: t.fill_(255), r"exp_avg_sq = 255 .*\[0, 248\]"),
        ("exp_avg_sq", lambda t: t.to(torch.int8), "exp_avg_sq dtype"),
    ],
)
def test_damaged_int8_state_is_refused(field, damage, message):
    _, optimizer, theta = quadratic_run("int8", steps=2)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0][field] = damage(saved["state"][0][field])
    fresh = decoupled.AdamW([theta], lr=1e-2, **INT8)
    with pytest.raises(ValueError, match=f"Invalid state for parameter 0 .*{message}"):
        fresh.load_state_dict(saved)


def test_invalid_state_dtype_and_amsgrad_are_refused():
    theta = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="Invalid state_dtype value: int4"):
        decoupled.AdamW(theta, state_dtype="int4")
    with pytest.raises(ValueError, match="Invalid state_dtype value: int8 with amsgrad"):
        decoupled.AdamW(theta, state_dtype=torch.int8, amsgrad=True)
    assert decoupled.Adam(theta, **INT8).param_groups[0]["state_dtype"] == torch.int8


def _trained(param, state_dtype, steps=3, **kwargs):
    optimizer = decoupled.AdamW([param], lr=1e-3, state_dtype=state_dtype, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        param.grad = (torch.randn(param.shape, generator=generator) * 1e-6).to(param.dtype)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("state_dtype", ["int8", torch.bfloat16])
def test_a_load_keeps_the_saved_dtypes_of_compact_state(state_dtype):
    """torch casts every loaded state tensor to θ's dtype: float16 θ would flush small v (and
    int8 scales) to 0, then step by lr·m/ε. Loaded state keeps its dtypes, the values are
    the saved ones, and a checkpoint saved again before any step loads again."""
    theta = torch.nn.Parameter(torch.randn(600).half())
    optimizer = _trained(theta, state_dtype)
    saved = copy.deepcopy(optimizer.state_dict())
    twin = torch.nn.Parameter(theta.detach().clone())
    loaded = decoupled.AdamW([twin], lr=1e-3, state_dtype=state_dtype)
    loaded.load_state_dict(copy.deepcopy(saved))
    for key, value in saved["state"][0].items():
        assert loaded.state[twin][key].dtype == value.dtype, key
        assert torch.equal(loaded.state[twin][key], value), key
    again = decoupled.AdamW([twin], lr=1e-3, state_dtype=state_dtype)
    again.load_state_dict(copy.deepcopy(loaded.state_dict()))  # refused before: float codes
    before = twin.detach().clone()
    twin.grad = torch.full_like(twin, 1e-6)
    again.step()
    assert (twin.float() - before.float()).abs().max() <= 2e-3  # a step of about lr


def test_coded_moments_loaded_into_another_memory_layout_keep_their_values():
    """Block scales follow the codes' memory order: codes copied into a channels_last θ's
    layout would be decoded with other blocks' scales. They are decoded first."""
    weight = torch.nn.Parameter(torch.randn(2, 64, 4, 4))
    optimizer = _trained(weight, "int8")
    state = optimizer.state[weight]
    expected = decode(state["exp_avg"], state["exp_avg_scale"], "exp_avg")
    channels_last = torch.nn.Parameter(weight.detach().to(memory_format=torch.channels_last))
    loaded = decoupled.AdamW([channels_last], lr=1e-3)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    exp_avg = loaded.state[channels_last]["exp_avg"]
    assert exp_avg.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(exp_avg, expected)


def test_an_amsgrad_checkpoint_is_refused_by_an_int8_optimizer_before_anything_changes():
    theta = torch.nn.Parameter(torch.randn(300))
    source = _trained(theta, None, amsgrad=True)
    target = _trained(torch.nn.Parameter(torch.randn(300)), "int8")
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="param group 0 of the checkpoint: amsgrad = True"):
        target.load_state_dict(copy.deepcopy(source.state_dict()))
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items())


def test_saved_moments_without_their_step_count_are_refused():
    source = _trained(torch.nn.Parameter(torch.randn(300)), "int8")
    saved = copy.deepcopy(source.state_dict())
    del saved["state"][0]["step"]
    target = decoupled.AdamW([torch.nn.Parameter(torch.randn(300))], state_dtype="int8")
    with pytest.raises(ValueError, match="step = missing \\(required with the saved exp_avg\\)"):
        target.load_state_dict(saved)


def square_law_state(value: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """decoupled 0.4's codes and scales of ``value`` (one block), rounded to nearest: the
    largest magnitude is the scale, m's codes ``q`` with ``(|q|/127)² ≈ |m|/s``, v's with
    ``(q/255)⁴ ≈ v/s``."""
    scale = value.abs().max().reshape(1)
    if key == "exp_avg":
        q = ((value.abs() / scale).sqrt() * 127).round() * value.sign()
        return q.to(torch.int8), scale
    return ((value / scale) ** 0.25 * 255).round().to(torch.uint8), scale


def test_upgrade_int8_state_converts_decoupled_0_4_moments():
    """A state dict with 0.4's square-law moments is refused as it is, naming the upgrade;
    upgraded, its moments decode to 0.4's values within one rounding to nearest (half a
    step: |x|/16 + T/16·s) and the optimizer steps on; a state dict in this format is left
    alone."""
    theta = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(4)))
    optimizer = decoupled.AdamW([theta], lr=1e-2, **INT8)
    theta.grad = torch.randn(200, generator=torch.Generator().manual_seed(5))
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    assert decoupled.optim.upgrade_int8_state(copy.deepcopy(saved)) == 0
    state = saved["state"][0]
    old_values = {}
    for key in ("exp_avg", "exp_avg_sq"):
        value = decode(state[key], state[key + "_scale"], key)
        state[key], state[key + "_scale"] = square_law_state(value, key)
        old_values[key] = _int8._scaled_levels(
            state[key], state[key + "_scale"], lambda q, key=key: _int8._square_law_levels(q, key)
        )
        assert (state[key].int().abs() == (127 if key == "exp_avg" else 255)).any()
    fresh = decoupled.AdamW([theta], lr=1e-2, **INT8)
    with pytest.raises(ValueError, match="upgrade_int8_state"):
        fresh.load_state_dict(copy.deepcopy(saved))
    assert decoupled.optim.upgrade_int8_state(saved) == 2
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        upgraded = decode(fresh.state[theta][key], fresh.state[theta][key + "_scale"], key)
        old = old_values[key]
        scale = fresh.state[theta][key + "_scale"]
        assert ((upgraded - old).abs() <= old.abs() / 16 + scale * CODES[key].unit / 2).all()
    fresh.step()
    assert fresh.state[theta]["exp_avg"].dtype == torch.int8
