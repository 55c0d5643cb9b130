"""int8 moments (``_int8.py``) in the one-pass C++ kernel against the reference loop.

Twin parameters fed the same gradients (a fixed random stream, not functions of θ) step once
through the kernel (``fused=None``) and once through the reference loop (``fused=False``).
The codes and scales must be equal bit for bit: the kernel decodes and codes with the
reference's float32 operations (``_int8.encode_``: power-of-two scales, the bit patterns of
8-bit floats, the same hash bits). θ is held to 1e-6 relative, the float32 kernel's bound
(``_kernels.py``: torch's CPU ``sqrt`` is not always correctly rounded, the kernel's is). With
Adam's L2 term those ulps of θ enter g, hence m and v: a code may then land one step away.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _build, _kernels
from decoupled.optim._int8 import levels, new_moments
from decoupled.optim.adam import adam_update

pytestmark = pytest.mark.usefixtures("one_thread")
CODE_KEYS = ("exp_avg", "exp_avg_sq")
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")


class RecordingOps:
    """The kernel module, recording each int8 step's answer (False: refused, nothing changed)."""

    def __init__(self, ops):
        self.ops, self.answers = ops, []

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def adam_int8_step_(self, *args):
        self.answers.append(self.ops.adam_int8_step_(*args))
        return self.answers[-1]


@pytest.fixture
def int8_log(monkeypatch):
    """(names of the update functions chosen, the kernel's int8 answers), in call order."""
    assert _kernels.kernel_ops() is not None, "the kernel does not build on this machine"
    recording = RecordingOps(_build.kernel_ops())
    monkeypatch.setattr(_build, "_ops", recording)
    chosen: list[str] = []
    choose = _kernels.choose_adam_update

    def spy(*args, **kwargs):
        update = choose(*args, **kwargs)
        chosen.append(update.__name__)
        return update

    monkeypatch.setattr(decoupled.optim.adam, "choose_adam_update", spy)
    return chosen, recording.answers


def make_params(shapes, channels_last, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        value = torch.randn(shape, generator=generator)
        if channels_last and value.dim() == 4:
            value = value.to(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(value))
    return params


def run_both(cls, kwargs, shapes, steps, channels_last=False):
    """(kernel optimizer, reference optimizer, kernel params, reference params)."""
    fast_params = make_params(shapes, channels_last)
    reference_params = make_params(shapes, channels_last)
    options = {"lr": 1e-2, "state_dtype": "int8", **kwargs}
    fast = cls(fast_params, fused=None, **options)
    reference = cls(reference_params, fused=False, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p_f, p_r in zip(fast_params, reference_params):
            grad = torch.randn(p_f.shape, generator=generator)
            p_f.grad, p_r.grad = grad.clone(), grad.clone()
        fast.step()
        reference.step()
    return fast, reference, fast_params, reference_params


def assert_matches(fast, reference, fast_params, reference_params, codes_exact=True):
    for p_f, p_r in zip(fast_params, reference_params):
        scale = p_r.detach().abs().max().clamp_min(1e-30)
        assert ((p_f - p_r).abs().max() / scale).item() <= 1e-6
        assert p_f.stride() == p_r.stride()
        s_f, s_r = fast.state[p_f], reference.state[p_r]
        assert torch.equal(s_f["step"], s_r["step"])
        for key in CODE_KEYS:
            assert s_f[key].dtype == s_r[key].dtype and s_f[key].stride() == s_r[key].stride()
            difference = (s_f[key].int() - s_r[key].int()).abs()
            assert difference.max() <= (0 if codes_exact else 1), key
            assert (difference != 0).float().mean() <= 1e-3, key
        for key in SCALE_KEYS:
            if codes_exact:
                assert torch.equal(s_f[key], s_r[key]), key
            else:
                relative = (s_f[key] - s_r[key]).abs() / s_r[key].clamp_min(1e-30)
                assert relative.max() <= 1e-5, key


SIZES = st.sampled_from([(1,), (255,), (256,), (257,), (3, 300), (2, 3, 5, 7), (4, 8, 3, 3)])


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    adamw=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    decay_to_init=st.booleans(),
    maximize=st.booleans(),
    shapes=st.lists(SIZES, min_size=1, max_size=4),
    channels_last=st.booleans(),
)
def test_kernel_matches_the_reference_loop(
    int8_log, adamw, weight_decay, decay_to_init, maximize, shapes, channels_last
):
    chosen, answers = int8_log
    chosen.clear()
    answers.clear()
    cls = decoupled.AdamW if adamw else decoupled.Adam
    kwargs = {"weight_decay": weight_decay, "maximize": maximize}
    if decay_to_init:
        kwargs["decay_to"] = "init"
    results = run_both(cls, kwargs, shapes, steps=6, channels_last=channels_last)
    assert chosen == ["kernel_adam_update", "adam_update"] * 6
    assert answers.count(True) == 6  # after a refusal, a retry with gradients laid out as θ
    l2 = not adamw and weight_decay != 0
    assert_matches(*results, codes_exact=not l2)


def test_kernel_matches_over_many_steps_chunks_and_tensors(int8_log):
    """40 000 elements span two kernel chunks and end in a partial block; many tensors share
    one parallel region; 30 steps of AdamW toward θ₀."""
    chosen, answers = int8_log
    shapes = [(40_000,), (16, 8, 3, 3), *[(17,)] * 20]
    kwargs = {"weight_decay": 0.1, "decay_to": "init"}
    results = run_both(decoupled.AdamW, kwargs, shapes, steps=30, channels_last=True)
    assert answers.count(True) == 30
    assert set(chosen[::2]) == {"kernel_adam_update"}
    assert_matches(*results)


def test_theta_is_bit_equal_to_the_reference_but_for_rare_roots(int8_log):
    """Bit for bit, θ may differ only where torch's CPU sqrt is one ulp off (about 1 element in
    2000 here): so the kernel and the reference compute sqrt(v̂) alike, as v's root times the
    float32 inverse of sqrt(1 − β2ᵗ) (a division there instead moves 3.5% of the elements)."""
    _, answers = int8_log
    results = run_both(decoupled.AdamW, {"weight_decay": 0.1}, [(200_000,)], steps=3)
    assert answers == [True] * 3
    fast_theta, reference_theta = results[2][0], results[3][0]
    assert (fast_theta != reference_theta).float().mean().item() <= 2e-3
    assert_matches(*results)


def test_wide_ranges_of_moments_and_zero_blocks(int8_log):
    """Gradients spanning twelve decades (most codes of v small, some 0) and a tensor whose
    gradient is zero (zero scales, as the reference keeps them)."""
    _, answers = int8_log
    fast, reference, p_f, p_r = run_both(decoupled.Adam, {}, [(600,), (300,)], steps=5)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        decades = torch.rand(600, generator=generator) * 12 - 6
        grad = torch.randn(600, generator=generator) * 10**decades
        p_f[0].grad, p_r[0].grad = grad.clone(), grad.clone()
        p_f[1].grad, p_r[1].grad = torch.zeros(300), torch.zeros(300)
        fast.step()
        reference.step()
    assert all(answers)
    assert_matches(fast, reference, p_f, p_r)
    assert (fast.state[p_f[0]]["exp_avg_sq"] == 0).any()


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_extreme_block_scales_code_as_the_reference(int8_log, flush_denormal):
    """With β1 = 0 (m is the gradient): blocks of m whose largest is subnormal (scale 2⁻¹²⁶),
    just below 2¹²⁶ (the largest finite scale, whose inverse 2⁻¹²⁶ is still normal: flushing
    denormals changes nothing), 3e38 (scale ∞, the block coded 0), and negative zeros; v is
    infinite in the large blocks. Codes and scales as the reference's, bit for bit."""
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        _, answers = int8_log
        options = {"betas": (0.0, 0.999)}
        fast, reference, p_f, p_r = run_both(decoupled.Adam, options, [(1024,)], steps=1)
        generator = torch.Generator().manual_seed(3)
        grad = torch.randn(1024, generator=generator)
        grad[:256] *= 1e-40
        grad[256:512] *= 1e37
        grad[300] = torch.tensor(2.0**126).nextafter(torch.tensor(0.0))
        grad[512:768] *= 1e37
        grad[600] = 3e38
        grad[800:900] = -0.0
        p_f[0].grad, p_r[0].grad = grad.clone(), grad.clone()
        fast.step()
        reference.step()
        assert all(answers)
        s_f, s_r = fast.state[p_f[0]], reference.state[p_r[0]]
        tiny = 0.0 if flush_denormal else 2.0**-126  # flushed, the subnormal block is 0
        assert s_r["exp_avg_scale"][:3].tolist() == [tiny, 2.0**126, math.inf]
        for key in CODE_KEYS + SCALE_KEYS:
            assert torch.equal(s_f[key], s_r[key]), key
    finally:
        torch.set_flush_denormal(False)


def test_fused_false_and_a_refused_tensor_take_the_reference_loop(int8_log):
    chosen, answers = int8_log
    strided = torch.nn.Parameter(torch.randn(10, 20)[:, ::2])  # not dense: the kernel refuses
    optimizer = decoupled.AdamW([strided], lr=1e-2, state_dtype="int8")
    twin = torch.nn.Parameter(strided.detach().clone())
    reference = decoupled.AdamW([twin], lr=1e-2, state_dtype="int8", fused=False)
    for _ in range(3):
        grad = torch.randn(10, 10)
        strided.grad, twin.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    assert chosen == ["kernel_adam_update", "adam_update"] * 3
    assert len(answers) >= 3 and not any(answers)
    assert torch.equal(strided, twin)
    for key in CODE_KEYS + SCALE_KEYS:
        assert torch.equal(optimizer.state[strided][key], reference.state[twin][key])


def test_a_nan_gradient_makes_its_block_nan_as_the_reference(int8_log):
    _, answers = int8_log
    fast_params, reference_params = make_params([(600,)], False), make_params([(600,)], False)
    fast = decoupled.AdamW(fast_params, lr=1e-2, state_dtype="int8")
    reference = decoupled.AdamW(reference_params, lr=1e-2, state_dtype="int8", fused=False)
    grad = torch.ones(600)
    grad[300] = float("nan")  # block 1 of 3
    for optimizer, (param,) in ((fast, fast_params), (reference, reference_params)):
        param.grad = grad.clone()
        optimizer.step()
    assert answers == [True]
    s_f, s_r = fast.state[fast_params[0]], reference.state[reference_params[0]]
    for key in SCALE_KEYS:
        assert torch.equal(s_f[key].isnan(), torch.tensor([False, True, False]))
        assert torch.equal(s_f[key][[0, 2]], s_r[key][[0, 2]])
    assert torch.equal(fast_params[0].isnan(), reference_params[0].isnan())


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_an_infinite_gradient_codes_its_block_as_the_reference(int8_log, flush_denormal):
    """An infinite gradient makes its block's scales infinite and every code of the block 0
    (no product by an infinite or denormal inverse scale, so flushing denormals changes
    nothing); a second step decodes what the first one coded (0·∞: the block goes NaN, as in
    the reference), and the other blocks step on."""
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        _infinite_gradient_steps(int8_log)
    finally:
        torch.set_flush_denormal(False)


def _infinite_gradient_steps(int8_log):
    _, answers = int8_log
    fast_params, reference_params = make_params([(600,)], False), make_params([(600,)], False)
    fast = decoupled.AdamW(fast_params, lr=1e-2, state_dtype="int8")
    reference = decoupled.AdamW(reference_params, lr=1e-2, state_dtype="int8", fused=False)
    grad = torch.linspace(-1, 1, 600)
    grad[300] = float("inf")  # block 1 of 3
    s_f, s_r = fast.state[fast_params[0]], reference.state[reference_params[0]]
    for step in range(2):
        for optimizer, (param,) in ((fast, fast_params), (reference, reference_params)):
            param.grad = grad.clone()
            optimizer.step()
        if step == 0:
            assert s_r["exp_avg_sq_scale"][1].isinf() and s_r["exp_avg_scale"][1].isinf()
            for key in CODE_KEYS:
                assert not s_r[key][256:512].any(), key
                assert s_r[key][:256].any() and s_r[key][512:].any(), key
        for key in CODE_KEYS + SCALE_KEYS:
            assert torch.equal(s_f[key].nan_to_num(), s_r[key].nan_to_num()), (step, key)
        assert torch.equal(fast_params[0].isnan(), reference_params[0].isnan())
        finite = ~reference_params[0].isnan()
        torch.testing.assert_close(fast_params[0][finite], reference_params[0][finite])
    assert answers == [True, True]


def test_values_at_and_next_to_the_levels_code_alike(int8_log):
    """With β1 = 0, m is the gradient: gradients on the levels d(q) of the code (q up to 127,
    past the largest written, so every block's scale is 2 and d(q) is a level of it for
    q >= 16) and one float below them, where a rounding could go either way; the kernel takes
    the same code as the reference, since both compute the same float32 operations."""
    _, answers = int8_log
    on = levels(torch.arange(128), "exp_avg")
    below = on.clone()
    below[1:127] = torch.nextafter(on[1:127], torch.tensor(0.0))
    grads = torch.cat([on, below]).repeat(4)
    signs = torch.where(torch.arange(grads.numel()) % 3 == 0, -1.0, 1.0)
    fast_params, reference_params = make_params([(1024,)], False), make_params([(1024,)], False)
    options = {"lr": 1e-2, "betas": (0.0, 0.999), "state_dtype": "int8"}
    fast = decoupled.Adam(fast_params, **options)
    reference = decoupled.Adam(reference_params, fused=False, **options)
    for step in range(3):
        grad = grads.roll(step) * signs
        fast_params[0].grad, reference_params[0].grad = grad.clone(), grad.clone()
        fast.step()
        reference.step()
    assert answers == [True] * 3
    assert_matches(fast, reference, fast_params, reference_params)


def test_the_loss_scale_is_divided_out_as_in_the_reference(int8_log):
    """GradScaler's protocol (``grad_scale``): g ← g / scale, written back, then the step."""
    _, answers = int8_log
    runs = []
    for update in (_kernels.kernel_adam_update, adam_update):
        (param,) = make_params([(700,)], False)
        state = {"step": torch.tensor(0.0), **new_moments(param, CODE_KEYS)}
        grad = torch.randn(700, generator=torch.Generator().manual_seed(3)) * 1024
        options = {"fallback": adam_update} if update is not adam_update else {}
        for _ in range(3):
            update(
                [param.data], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                [state["step"]], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled=True, decay_rate=1e-3, grad_scale=torch.tensor(1024.0),
                coded_states=[state], **options,
            )  # fmt: skip
        runs.append((param.detach(), grad, state))
    assert answers == [True] * 3
    (p_f, g_f, s_f), (p_r, g_r, s_r) = runs
    assert torch.equal(g_f, g_r)  # unscaled in place, three times
    assert ((p_f - p_r).abs().max() / p_r.abs().max()).item() <= 1e-6
    for key in CODE_KEYS + SCALE_KEYS:
        assert torch.equal(s_f[key], s_r[key]), key


@pytest.mark.parametrize("decay_to", ["zero", "init"])
def test_cautious_decay_with_int8_moments_in_the_kernel_equals_the_reference_loop(
    int8_log, decay_to
):
    """Cautious decay (the mask by the sign of m_t) in the int8 kernel: θ, codes and scales as
    the reference loop's, over steps where the mask is partly on."""
    chosen, answers = int8_log
    chosen.clear()
    answers.clear()
    options = {"weight_decay": 0.5, "cautious": True, "decay_to": decay_to}
    results = run_both(decoupled.AdamW, options, [(300,), (2, 3, 5, 7)], steps=4)
    assert chosen == ["kernel_adam_update", "adam_update"] * 4
    assert answers == [True] * 4
    assert_matches(*results)
