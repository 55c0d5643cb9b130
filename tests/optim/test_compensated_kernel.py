"""Compensated bfloat16/float16 weights (``_compensated.py``) in the one-pass C++ kernel against
the reference loop.

Twin parameters fed the same gradients step once through the kernel (``fused=None``) and once
through the reference loop (``fused=False``); θ (compared as bits), its int8 remainder and
every state tensor must be equal bit for bit, over many steps. The kernel computes each element
with the reference's operations in the reference's order, with one exception told in
``_kernels.py``'s module docstring: its ``sqrt`` is IEEE's, correctly rounded, and torch's CPU
``sqrt`` is not always. A master weight off by one float32 ulp can move the remainder by a unit
or θ to its other rounding, so the bit-for-bit tests run the reference with torch's ``sqrt``
replaced by a correctly rounded one (float64, then rounded to float32: exact for sqrt, as 53 ≥
2·24 + 2 bits); everything else the reference computes is torch's own. With torch's own
``sqrt``, the moments (which do not read θ without an L2 term) stay equal bit for bit, and the
master weights within one remainder unit per step (``test_with_torchs_own_sqrt_...``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _kernels
from decoupled.optim._compensated import REMAINDER, _unit, master
from decoupled.optim.adam import adam_update

pytestmark = pytest.mark.usefixtures("one_thread")
LOW = (torch.bfloat16, torch.float16)


def refused(*args, **kwargs):
    raise AssertionError("the kernel refused")


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits (16-bit floats), so that −0 ≠ 0 and each rounding counts."""
    return t.detach().view(torch.int16) if t.dtype in LOW else t.detach()


def assert_same(fast, reference, fast_params, reference_params):
    for p_f, p_r in zip(fast_params, reference_params):
        assert p_f.stride() == p_r.stride()
        assert torch.equal(bits(p_f), bits(p_r))
        s_f, s_r = fast.state[p_f], reference.state[p_r]
        assert s_f.keys() == s_r.keys() and REMAINDER in s_r
        for key, value in s_r.items():
            assert s_f[key].stride() == value.stride(), key
            assert torch.equal(bits(s_f[key]), bits(value)), key


def make_param(shape, dtype, layout, generator):
    """A parameter laid out as ``layout``: contiguous, channels_last, transposed (dense, not
    contiguous: the kernel takes it) or strided (every other element: not dense, refused)."""
    value = torch.randn(shape, generator=generator).to(dtype)
    if layout == "channels_last" and value.dim() == 4:
        value = value.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and value.dim() >= 2:
        value = value.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "strided":
        value = torch.stack([value, value], dim=-1)[..., 0]
    return torch.nn.Parameter(value)


def run_twins(cls, options, shapes, dtype, steps, layout="contiguous", grad_scale=None):
    """Twin (optimizer, params) pairs, kernel then reference, after ``steps`` steps."""
    twins = []
    for fused in (None, False):
        generator = torch.Generator().manual_seed(0)
        params = [make_param(shape, dtype, layout, generator) for shape in shapes]
        twins.append((cls(params, fused=fused, **options), params))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in twins[0][1]]
        for optimizer, params in twins:
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            if grad_scale is not None:  # GradScaler's protocol: g ← g/scale inside the step
                optimizer.grad_scale, optimizer.found_inf = torch.tensor(grad_scale), None
            optimizer.step()
    (fast, fast_params), (reference, reference_params) = twins
    return fast, reference, fast_params, reference_params


SIZES = st.sampled_from([(1,), (63,), (64,), (65,), (3, 300), (2, 3, 5, 7), (4, 8, 3, 3)])
RATES = {"lr": 0.1, "schedule": 0.1, "constant": 1e-3, "corrected": 0.1}


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(LOW),
    state_dtype=st.sampled_from([None, "bfloat16"]),
    optimizer=st.sampled_from(["adam", "adamw", "adamw-cautious"]),
    decay_scale=st.sampled_from(sorted(RATES)),
    decay=st.booleans(),
    decay_to=st.sampled_from(["zero", "init"]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    shapes=st.lists(SIZES, min_size=1, max_size=3),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "strided"]),
)
def test_kernel_equals_the_reference_loop_bit_for_bit(
    exact_sqrt, path_log, dtype, state_dtype, optimizer, decay_scale, decay, decay_to,
    amsgrad, maximize, shapes, layout,
):  # fmt: skip
    """Every option, both θ dtypes, bfloat16 moments (float16 θ's own float16 moments are not
    the kernel's: see test_the_kernel_steps_...), layouts; a strided θ is refused (the
    reference loop steps it)."""
    if dtype == torch.float16:
        state_dtype = "bfloat16"
    path_log.clear()
    options = {"lr": 1e-2, "amsgrad": amsgrad, "maximize": maximize, "decay_to": decay_to}
    options["state_dtype"] = state_dtype
    if optimizer == "adam":
        cls = decoupled.Adam
        options["weight_decay"] = 0.1 if decay else 0.0
    else:
        cls = decoupled.AdamW
        options |= {"decay_scale": decay_scale, "cautious": optimizer == "adamw-cautious"}
        options["weight_decay"] = RATES[decay_scale] if decay else 0.0
    results = run_twins(cls, options, shapes, dtype, steps=8, layout=layout)
    # one non-dense tensor sends its group to the reference loop (one element is dense)
    strided = layout == "strided" and any(math.prod(shape) > 1 for shape in shapes)
    fast = "kernel_adam_update" + (" (refused)" if strided else "")
    assert path_log == [fast, "adam_update"] * 8
    assert_same(*results)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(LOW),
    decoupled_=st.booleans(),
    decay_scale=st.sampled_from(sorted(RATES)),
    decay=st.booleans(),
    decay_to=st.sampled_from(["zero", "init"]),
    maximize=st.booleans(),
    shapes=st.lists(st.sampled_from([(1,), (255,), (256,), (257,), (3, 300)]), max_size=3),
    layout=st.sampled_from(["contiguous", "transposed"]),
)
def test_int8_moments_over_compensated_weights_equal_the_reference_bit_for_bit(
    exact_sqrt, path_log, dtype, decoupled_, decay_scale, decay, decay_to, maximize, shapes,
    layout,
):  # fmt: skip
    """The 7-byte combination (bfloat16 θ + remainder + int8 moments) and float16 θ with int8
    moments: θ, remainder, codes and scales as the reference loop's, across int8 blocks."""
    path_log.clear()
    options = {"lr": 1e-2, "maximize": maximize, "decay_to": decay_to, "state_dtype": "int8"}
    if decoupled_:
        cls = decoupled.AdamW
        options |= {"decay_scale": decay_scale, "weight_decay": RATES[decay_scale] * decay}
    else:
        cls, options["weight_decay"] = decoupled.Adam, 0.1 * decay
    results = run_twins(cls, options, shapes or [(300,)], dtype, steps=6, layout=layout)
    assert path_log == ["kernel_adam_update", "adam_update"] * 6
    assert_same(*results)


def test_chunk_boundaries_many_tensors_and_the_loss_scale(exact_sqrt, path_log):
    """Tensors across the kernel's 32768-element chunks and its 64-element prefetch blocks,
    one group, amsgrad and θ₀, gradients divided by a loss scale (rounded to θ's dtype)."""
    shapes = [(32769,), (63,), (1025,), (2, 32768)]
    options = {"lr": 1e-2, "amsgrad": True, "decay_to": "init", "weight_decay": 0.1}
    for dtype, scale in ((torch.bfloat16, 1024.0), (torch.float16, 3.0)):
        path_log.clear()
        options["state_dtype"] = "bfloat16"
        results = run_twins(decoupled.AdamW, options, shapes, dtype, steps=3, grad_scale=scale)
        assert path_log == ["kernel_adam_update", "adam_update"] * 3
        assert_same(*results)
        for p_f, p_r in zip(results[2], results[3]):
            assert torch.equal(bits(p_f.grad), bits(p_r.grad))  # unscaled in place


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_float32_moments_through_the_functional_core(exact_sqrt, dtype):
    """Float32 moments (the functional core takes them; the optimizers keep bfloat16 or θ's
    dtype), amsgrad, θ₀ in θ's dtype, a loss scale; the kernel must not refuse."""
    generator = torch.Generator().manual_seed(2)
    theta = torch.randn(5000, generator=generator).to(dtype)
    reference_theta = torch.randn(5000, generator=generator).to(dtype)
    runs = []
    for update in (_kernels.kernel_adam_update, adam_update):
        param, remainder = theta.clone(), torch.zeros(5000, dtype=torch.int8)
        m, v, v_max = (torch.zeros(5000) for _ in range(3))
        step = torch.tensor(0.0)
        fallback = {"fallback": refused} if update is not adam_update else {}
        generator = torch.Generator().manual_seed(3)
        for _ in range(8):
            grad = (torch.randn(5000, generator=generator) * 1024).to(dtype)
            update(
                [param], [grad], [m], [v], [v_max], [step], lr=1e-2, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, decoupled=True, decay_rate=1e-3, amsgrad=True,
                references=[reference_theta], grad_scale=torch.tensor(1024.0),
                remainders=[remainder], **fallback,
            )  # fmt: skip
        runs.append([param, remainder, m, v, v_max, step])
    assert runs[1][1].abs().sum() > 0  # the remainders carry something
    for fast, reference in zip(*runs):
        assert torch.equal(bits(fast), bits(reference))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_every_weight_pattern_loads_and_stores_as_the_reference(dtype):
    """Every bit pattern of θ (zeros, subnormals, normals, infinities, NaNs) with remainders
    from −128 to 127, through a step that changes nothing (lr = 0, g = 0): the master weight is
    loaded and stored back (θ rounded to nearest, even on a tie at r = −128; r rounded
    stochastically) as the reference does, bit for bit; NaN θ stays NaN with r = 0."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    remainders = torch.tensor([-128, -127, -1, 0, 1, 64, 127], dtype=torch.int8)
    theta0 = patterns.repeat(len(remainders))
    remainder0 = remainders.repeat_interleave(len(patterns))
    runs = []
    for update in (_kernels.kernel_adam_update, adam_update):
        theta, remainder = theta0.clone(), remainder0.clone()
        moments = [torch.zeros_like(theta, dtype=torch.bfloat16) for _ in range(2)]
        fallback = {"fallback": refused} if update is not adam_update else {}
        update(
            [theta], [torch.zeros_like(theta)], *[[m] for m in moments], [],
            [torch.tensor(4.0)], lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
            decoupled=True, remainders=[remainder], **fallback,
        )  # fmt: skip
        runs.append((theta, remainder))
    (theta_f, r_f), (theta_r, r_r) = runs
    nan = theta_r.isnan()
    assert torch.equal(theta_f.isnan(), nan) and nan.sum() > 0
    assert torch.equal(bits(theta_f)[~nan], bits(theta_r)[~nan])
    assert torch.equal(r_f, r_r) and (r_r[nan] == 0).all()
    # the master weight is kept, but for ties (r = −128) that round θ to its even neighbour
    kept = theta0.isfinite() & (remainder0 != -128)
    assert torch.equal(master(theta_f, r_f)[kept], master(theta0, remainder0)[kept])


def test_nonfinite_gradients_and_overflow_as_the_reference(exact_sqrt):
    """NaN and infinite gradients, and master weights that round to an infinite bfloat16
    (r = −128 there, as the reference's clamp of −inf); a NaN master weight keeps r = 0."""
    runs = []
    for update in (_kernels.kernel_adam_update, adam_update):
        largest = torch.finfo(torch.bfloat16).max  # + 1e36: above it by more than half an ulp
        theta = torch.tensor([1.0, -2.0, 3.0, largest, -largest, 0.5]).bfloat16()
        remainder = torch.tensor([5, -7, 0, 0, 0, 1], dtype=torch.int8)
        grad = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 1.0, 0.0])
        moments = [torch.zeros(6, dtype=torch.bfloat16) for _ in range(2)]
        fallback = {"fallback": refused} if update is not adam_update else {}
        update(
            [theta], [grad.bfloat16()], *[[m] for m in moments], [], [torch.tensor(0.0)],
            lr=1e36, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
            remainders=[remainder], **fallback,
        )  # fmt: skip
        runs.append((theta, remainder, *moments))
    assert runs[1][0][3:5].isinf().all() and runs[1][0][:3].isnan().all()
    assert runs[1][1].tolist()[:5] == [0, 0, 0, -128, 127]
    for fast, reference in zip(*runs):
        assert torch.equal(fast.isnan(), reference.isnan())
        assert torch.equal(bits(fast)[~reference.isnan()], bits(reference)[~reference.isnan()])


def test_state_dict_round_trips_between_the_kernel_and_the_reference(exact_sqrt, path_log):
    """A kernel checkpoint resumed by the reference loop, and the reverse, continue as the
    uninterrupted run does, bit for bit; a torch.optim state dict (no remainder) loads with
    r = 0 into the kernel."""
    options = {"lr": 1e-2, "weight_decay": 0.1, "decay_to": "init", "amsgrad": True}
    shapes = [(40, 30), (77,)]
    straight = run_twins(decoupled.AdamW, options, shapes, torch.bfloat16, steps=8)
    first = run_twins(decoupled.AdamW, options, shapes, torch.bfloat16, steps=4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # the gradients run_twins drew for steps 1 to 4
        [torch.randn(shape, generator=generator) for shape in shapes]
    resumed = []
    for trained, params, fused in ((first[0], first[2], False), (first[1], first[3], None)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = decoupled.AdamW(params, fused=fused, **options)
        optimizer.load_state_dict(copy.deepcopy(trained.state_dict()))
        resumed.append((optimizer, params))
    for _ in range(4):
        grads = [torch.randn(shape, generator=generator).bfloat16() for shape in shapes]
        for optimizer, params in resumed:
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    (from_kernel, params_k), (from_reference, params_r) = resumed
    assert_same(straight[1], from_kernel, straight[3], params_k)
    assert_same(straight[0], from_reference, straight[2], params_r)
    assert path_log[-2:] == ["adam_update", "kernel_adam_update"]

    param = torch.nn.Parameter(torch.randn(50).bfloat16())
    theirs = torch.optim.AdamW([param], lr=1e-2)
    param.grad = torch.randn(50).bfloat16()
    theirs.step()
    ours = decoupled.AdamW([param], lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    path_log.clear()
    ours.step()
    assert path_log == ["kernel_adam_update"] and ours.state[param][REMAINDER].abs().sum() > 0


def test_the_kernel_steps_compensated_groups_and_only_those_it_can(path_log):
    """bfloat16/float16 θ with bfloat16 or int8 moments take the kernel, also with fused=True
    (torch's fused kernels would drop the remainder); fused=False, float16 moments (float16 θ's
    default) and a group mixing float32 and bfloat16 θ take the reference loop."""
    cases = [
        ({}, [torch.bfloat16], "kernel_adam_update"),
        ({"fused": True}, [torch.bfloat16], "kernel_adam_update"),
        ({"state_dtype": "bfloat16"}, [torch.float16], "kernel_adam_update"),
        ({"fused": False}, [torch.bfloat16], "adam_update"),
        ({"state_dtype": "int8"}, [torch.bfloat16], "kernel_adam_update"),
        ({"state_dtype": "int8"}, [torch.float16], "kernel_adam_update"),
        ({}, [torch.float16], "kernel_adam_update (refused)"),
        ({}, [torch.bfloat16, torch.float32], "adam_update"),
    ]
    for options, dtypes, expected in cases:
        params = [torch.nn.Parameter(torch.randn(300).to(dtype)) for dtype in dtypes]
        optimizer = decoupled.AdamW(params, lr=1e-2, **options)
        path_log.clear()
        for _ in range(2):
            for param in params:
                param.grad = torch.randn(300).to(param.dtype)
            optimizer.step()
        assert path_log == [expected] * 2, (options, dtypes)
        compensated = [p for p in params if p.dtype in LOW]
        assert all(optimizer.state[p][REMAINDER].abs().sum() > 0 for p in compensated)


def test_with_torchs_own_sqrt_the_moments_stay_equal_and_the_weights_close(path_log):
    """The real default: torch's ``sqrt`` in the reference. Moments (no L2 term: they do not
    read θ) stay bit for bit; master weights differ by at most one remainder unit per step,
    rarely."""
    steps = 20
    options = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    fast, reference, fast_params, reference_params = run_twins(
        decoupled.AdamW, options, [(70000,)], torch.bfloat16, steps
    )
    assert path_log == ["kernel_adam_update", "adam_update"] * steps
    (p_f,), (p_r,) = fast_params, reference_params
    s_f, s_r = fast.state[p_f], reference.state[p_r]
    for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(bits(s_f[key]), bits(s_r[key])), key
    w_f, w_r = master(p_f.detach(), s_f[REMAINDER]), master(p_r.detach(), s_r[REMAINDER])
    assert ((w_f - w_r).abs() <= steps * _unit(p_r.detach())).all()
    assert (s_f[REMAINDER] != s_r[REMAINDER]).float().mean() <= 1e-3
