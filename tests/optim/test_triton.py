"""The Triton path under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) against
the reference loops: every option, group layouts and chunk boundaries, bfloat16 stochastic
rounding bit for bit, state-dict round trips between paths, cautious decay against a float64
formula, the device-side decisions of ``capturable=True``, ``step_in_backward``, and the
``triton=`` errors.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it is set while the kernels'
module is first imported; a process that imported it compiled (a CUDA run of
``test_cuda.py`` first) skips these tests.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _compact, _triton
from decoupled.optim.adam import adam_update
from decoupled.optim.sgd import sgd_update
from tests.helpers import (
    assert_same_training_state,
    drawn_sgd_options,
    steps_with_a_shared_gradient,
)

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    kernels = importlib.import_module("decoupled.optim._triton_kernels")
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

INTERPRETED = type(kernels.adam_kernel).__name__ == "InterpretedFunction"
pytestmark = [
    pytest.mark.skipif(
        not INTERPRETED, reason="the Triton kernels were compiled (not interpreted) in this process"
    ),
    pytest.mark.usefixtures("triton_interpreter"),
]

SHAPES = [(5,), (70,), (9, 13), (1,)]  # with BLOCK = 64: several chunks, ragged ends
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step")


def make_params(seed=0, shapes=SHAPES, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def train(cls, params, steps, seed=1, **options):
    """``steps`` steps of ``cls`` on ``params`` with seeded gradients; the optimizer."""
    optimizer = cls(params, **options)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()
    return optimizer


def assert_same(ours, theirs, params_ours, params_theirs, rtol=1e-6, atol=1e-7):
    """Parameters and every state tensor of two runs agree."""
    for p, q in zip(params_ours, params_theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)
        state_p, state_q = ours.state[p], theirs.state[q]
        assert set(state_p) == set(state_q)
        for key in state_p:
            a, b = state_p[key], state_q[key]
            if torch.is_tensor(a):
                tol = {"rtol": 2**-7, "atol": 1e-30} if a.dtype == torch.bfloat16 else {}
                torch.testing.assert_close(
                    a.float(), b.float(), **({"rtol": rtol, "atol": atol} | tol), msg=key
                )


def compare(cls, steps=3, shapes=SHAPES, **options):
    reference_params, triton_params = make_params(shapes=shapes), make_params(shapes=shapes)
    reference = train(cls, reference_params, steps, fused=False, **copy.deepcopy(options))
    ours = train(cls, triton_params, steps, triton=True, **options)
    assert_same(ours, reference, triton_params, reference_params)


ADAM_OPTIONS = st.fixed_dictionaries(
    {
        "cls": st.sampled_from([decoupled.Adam, decoupled.AdamW]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
        "decay_to": st.sampled_from(["zero", "init"]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "state_dtype": st.sampled_from([None, torch.bfloat16]),
        "lr": st.sampled_from([1e-2, "tensor"]),
        "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.5)]),
    }
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(options=ADAM_OPTIONS)
def test_adam_matches_the_reference_loop(options, launches):
    options = dict(options)
    cls = options.pop("cls")
    if options["lr"] == "tensor":
        options["lr"] = torch.tensor(1e-2)
    before = launches["adam_kernel"]
    compare(cls, **options)
    assert launches["adam_kernel"] == before + 3


@pytest.mark.parametrize(
    "decay",
    [
        {"decay_scale": "schedule", "max_lr": 0.02},
        {"decay_scale": "constant", "weight_decay": 1e-3},
        {"decay_scale": "corrected", "max_lr": 0.02},
        {"lambda_norm": 0.05, "decay_period": 10},
        {"weight_decay": lambda step: 0.1 * step},
    ],
    ids=["schedule", "constant", "corrected", "lambda_norm", "schedule_fn"],
)
def test_adamw_every_decay_convention(decay, launches):
    compare(decoupled.AdamW, lr=1e-2, **decay)
    assert launches["adam_kernel"] == 3


SGD_OPTIONS = st.fixed_dictionaries(
    {
        "cls": st.sampled_from([decoupled.SGD, decoupled.SGDW]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "nesterov": st.booleans(),
        "maximize": st.booleans(),
        "decay_to": st.sampled_from(["zero", "init"]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "lr": st.sampled_from([1e-2, "tensor"]),
    }
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(options=SGD_OPTIONS)
def test_sgd_matches_the_reference_loop(options, launches):
    cls, options = drawn_sgd_options(options, lr=1e-2)
    before = launches["sgd_kernel"]
    compare(cls, **options)
    assert launches["sgd_kernel"] == before + 3


def test_group_layouts_many_tensors_chunk_boundaries_and_layouts(launches):
    """Many tensors of odd sizes around the chunk size (64 here), 0-dim and empty ones, a
    channels_last weight with a contiguous gradient (copied into its layout), in two groups."""
    shapes = [(), (0,), (1,), (63,), (64,), (65,), (128,), (129,), (3, 5, 7)]
    shapes += [(k,) for k in range(2, 30)]
    for cls in (decoupled.AdamW, decoupled.SGDW):
        extra = {"momentum": 0.9} if cls is decoupled.SGDW else {"amsgrad": True}
        runs = []
        for options in ({"fused": False}, {"triton": True}):
            params = make_params(shapes=shapes)
            weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(9))
            conv = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
            groups = [{"params": params[:20]}, {"params": params[20:] + [conv], "lr": 3e-3}]
            optimizer = cls(groups, lr=1e-2, weight_decay=0.1, **extra, **options)
            generator = torch.Generator().manual_seed(3)
            for _ in range(3):
                for p in [*params, conv]:
                    p.grad = torch.randn(p.shape, generator=generator).contiguous()
                optimizer.step()
            runs.append((optimizer, [*params, conv]))
        (reference, reference_params), (ours, our_params) = runs
        assert_same(ours, reference, our_params, reference_params)
    assert launches["adam_kernel"] == 6 and launches["sgd_kernel"] == 6


def _float32_reference_step(cls, param, state, grad, **options):
    """One step of the reference loop on float32 copies, rounded back to ``param.dtype``:
    what the kernel computes for a low-precision θ (float32 arithmetic, one rounding)."""
    dtype = param.dtype
    wide = torch.nn.Parameter(param.detach().float())
    optimizer = cls([wide], fused=False, **options)
    if state:
        optimizer.state[wide] = {
            k: (v.float() if k != "step" else v.clone()) for k, v in state.items()
        }
    wide.grad = grad.float()
    optimizer.step()
    return wide.detach().to(dtype), {
        k: (v.to(dtype) if k != "step" else v) for k, v in optimizer.state[wide].items()
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_low_precision_params_compute_in_float32_and_round_once(cls, dtype, launches):
    options = {"lr": 1e-2, "weight_decay": 0.1}
    if cls is decoupled.SGDW:
        options["momentum"] = 0.9
    (param,) = make_params(shapes=[(150,)], dtype=dtype)
    optimizer = cls([param], triton=True, compensate=False, **options)  # test_triton_compact
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        grad = torch.randn(param.shape, generator=generator).to(dtype)
        state = {k: v.clone() for k, v in optimizer.state[param].items()}
        expected, expected_state = _float32_reference_step(cls, param, state, grad, **options)
        param.grad = grad.clone()
        optimizer.step()
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10  # one rounding, maybe off by one ulp
        torch.testing.assert_close(param.detach(), expected, rtol=ulp, atol=1e-6)
        for key, value in expected_state.items():
            got = optimizer.state[param][key]
            assert got.dtype == value.dtype, key
            torch.testing.assert_close(got.float(), value.float(), rtol=ulp, atol=1e-6, msg=key)
    assert launches["adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"] == 3


def test_stochastic_rounding_is_bit_equal_to_compact_reference():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3000, generator=generator) * torch.logspace(-30, 30, 3000)
    values[:6] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 3.3895e38])
    bits = _compact.rounding_bits(values.numel(), step=7.0, position=3, device=values.device)
    for random16 in (bits & 0xFFFF, bits >> 16, _compact._mix(bits) & 0xFFFF):
        expected = torch.empty(values.shape, dtype=torch.bfloat16)
        _compact.stochastic_round_(expected, values, random16)
        got = torch.empty(values.shape, dtype=torch.bfloat16)
        block = 1024
        kernels.stochastic_round_kernel[(triton_cdiv(values.numel(), block),)](
            got.view(torch.int16), values, random16.to(torch.int32), values.numel(), BLOCK=block
        )
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_bfloat16_moments_round_like_the_reference_bit_for_bit():
    """Same inputs, same hash (element, position, step): the stored bfloat16 moments are the
    reference's bit for bit (the moments' arithmetic is the reference's: lerp and addcmul)."""
    runs = []
    for options in ({"fused": False}, {"triton": True}):
        params = make_params(shapes=[(70,), (9, 13)])
        runs.append(
            train(decoupled.AdamW, params, 1, state_dtype=torch.bfloat16, amsgrad=True, **options)
        )
        runs[-1].params_ = params
    reference, ours = runs
    for p, q in zip(reference.params_, ours.params_):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            a, b = reference.state[p][key], ours.state[q][key]
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), key


@pytest.mark.parametrize(
    "first,second",
    [("triton", "kernel"), ("kernel", "triton"), ("reference", "triton"), ("triton", "reference")],
)
@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_state_dict_round_trips_between_paths(cls, first, second):
    """Two steps on one path, save, load into another path, two more steps: the same as four
    steps of the reference loop."""
    paths = {"triton": {"triton": True}, "kernel": {"triton": False}, "reference": {"fused": False}}
    options = {"lr": 1e-2, "weight_decay": 0.1}
    options |= {"momentum": 0.9} if cls is decoupled.SGDW else {"amsgrad": True}
    expected_params = make_params()
    expected = train(cls, expected_params, 4, **options, fused=False)

    params = make_params()
    saved = train(cls, params, 2, **options, **paths[first]).state_dict()
    resumed = cls(params, **options, **paths[second])
    resumed.load_state_dict(saved)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the gradients of steps 1–2, then those of steps 3–4
        for p in params:
            torch.randn(p.shape, generator=generator)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        resumed.step()
    assert_same(resumed, expected, params, expected_params)


def _cautious_float64(theta, theta0, grads, *, adam, lr, rate, **hyper):
    """The cautious rule in float64 (Chen, Li, Liang et al., arXiv 2510.12402):
    θ ← θ − mask·c·(θ − θ₀) − γ·u, mask = u·(θ − θ₀) ≥ 0."""
    theta, theta0 = theta.double(), theta0.double()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    masks = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if adam:
            b1, b2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            direction = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            sign_source = m
        else:
            mu = hyper["momentum"]
            m = g.clone() if t == 1 else mu * m + g
            direction = g + mu * m if hyper["nesterov"] else m
            sign_source = direction
        mask = sign_source * (theta - theta0) >= 0
        masks.append(mask)
        theta = theta - mask * rate * (theta - theta0) - lr * direction
    return theta, masks


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgdw"])
@pytest.mark.parametrize("toward_init", [False, True])
def test_cautious_decay_against_the_float64_formula(adam, toward_init):
    generator = torch.Generator().manual_seed(2)
    theta = torch.randn(200, generator=generator)
    theta0 = torch.randn(200, generator=generator) if toward_init else torch.zeros(200)
    grads = [torch.randn(200, generator=generator) for _ in range(4)]
    lr, rate = 1e-2, 0.05  # a large rate: a wrong mask moves θ by far more than rounding
    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "momentum": 0.9, "nesterov": not adam}
    expected, masks = _cautious_float64(theta, theta0, grads, adam=adam, lr=lr, rate=rate, **hyper)
    assert all(0 < int(mask.sum()) < 200 for mask in masks)  # both kinds of coordinate occur

    param = theta.clone()
    references = [theta0.clone()] if toward_init else None
    common = {"lr": lr, "weight_decay": 0.0, "decoupled": True, "decay_rate": rate}
    common |= {"references": references, "cautious": True, "fallback": None}
    m, v, step, buffers = torch.zeros(200), torch.zeros(200), torch.tensor(0.0), [None]
    for g in grads:
        if adam:
            _triton.triton_adam_update(
                [param], [g.clone()], [m], [v], [], [step], beta1=0.9, beta2=0.999, eps=1e-8,
                **common,
            )  # fmt: skip
        else:
            _triton.triton_sgd_update(
                [param], [g.clone()], buffers, momentum=0.9, dampening=0.0, nesterov=True,
                **common,
            )  # fmt: skip
    torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls,options",
    [
        (decoupled.AdamW, {"lr": 1e-2, "weight_decay": 0.5}),
        (decoupled.AdamW, {"lr": 1e-2, "weight_decay": 0.5, "decay_to": "init", "amsgrad": True}),
        (decoupled.SGDW, {"lr": 1e-2, "weight_decay": 0.5, "momentum": 0.9, "nesterov": True}),
        (decoupled.SGDW, {"lr": 1e-2, "weight_decay": 0.5, "maximize": True}),
    ],
)
def test_cautious_decay_matches_the_reference_loop(cls, options, launches):
    """``cautious=True`` through the Triton kernel against the reference loop's mask
    (``decay.cautious_mask``), over several steps, every state tensor."""
    compare(cls, steps=3, cautious=True, **options)
    assert launches["adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"] == 3


def test_cautious_mask_compares_signs_not_a_product_that_rounds_to_zero():
    """θ and the direction so small that their float32 product is 0: the signs still decide
    (the reference's rule), so a coordinate whose signs disagree is not decayed."""
    lr, weight_decay = 1e-12, 5e11  # c = γλ = 0.5, and γ·g far below θ
    param = torch.nn.Parameter(torch.tensor([1e-30, -1e-30, 1e-30]))
    optimizer = decoupled.SGDW(
        [param], lr=lr, weight_decay=weight_decay, cautious=True, triton=True
    )
    grad = torch.tensor([-1e-20, -1e-20, 1e-20])  # θ·g: disagrees, agrees, agrees
    assert torch.equal(param.detach() * grad, torch.zeros(3))  # the products round to ±0
    param.grad = grad.clone()
    optimizer.step()
    theta, g = torch.tensor([1e-30, -1e-30, 1e-30]).double(), grad.double()
    decayed = torch.tensor([False, True, True])
    expected = torch.where(decayed, theta * 0.5, theta) - lr * g  # θ·(1 − c) where decayed
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=0)


def test_capturable_decides_on_the_device():
    """``capturable=True``: steps on the parameters' device, a tensor lr read in the kernel,
    a NaN gradient or GradScaler's found_inf skips the step without reading a flag on the
    host; otherwise the same steps as the reference loop."""
    options = {"weight_decay": 0.1, "decay_scale": "schedule", "max_lr": 0.02}
    reference_params, params = make_params(), make_params()
    reference = train(decoupled.AdamW, reference_params, 3, fused=False, lr=1e-2, **options)
    ours = decoupled.AdamW(
        params, lr=torch.tensor(1e-2), triton=True, capturable=True, skip_nonfinite=True, **options
    )
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step == 1:  # a skipped step in between: nothing changes
            before = [p.detach().clone() for p in params]
            params[2].grad[0, 0] = math.nan
            ours.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            ours.found_inf = torch.tensor(1.0)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            ours.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            del ours.found_inf
        ours.step()
    assert torch.is_tensor(ours.skipped_steps) and float(ours.skipped_steps) == 1.0
    assert_same(ours, reference, params, reference_params)


def test_capturable_needs_the_triton_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = decoupled.AdamW([param], capturable=True)
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"Invalid capturable value: True \(parameters on cpu"):
        optimizer.step()
    assert torch.equal(param, torch.zeros(3))


def test_triton_option_errors(monkeypatch):
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid triton value: 'yes'"):
        decoupled.AdamW([param], triton="yes")
    with pytest.raises(ValueError, match=r"Invalid triton value: True with fused=False"):
        decoupled.SGDW([param], triton=True, fused=False)
    with pytest.raises(ValueError, match=r"Invalid capturable value: True with triton=False"):
        decoupled.Adam([param], capturable=True, triton=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    optimizer = decoupled.AdamW([param], triton=True)
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"Invalid triton value: True \(parameters on cpu.*"):
        optimizer.step()
    monkeypatch.setattr(_triton, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"Invalid triton value: True \(triton is not installed"):
        decoupled.SGD([param], triton=True)


def test_default_selection_and_the_warning_without_triton(monkeypatch):
    cpu = [torch.zeros(2)]
    cuda_like = [types.SimpleNamespace(device=torch.device("cuda"))]
    assert not _triton.use_triton(None, None, cpu)  # CPU tensors: the C++ kernel's
    assert not _triton.use_triton(False, None, cuda_like)
    assert not _triton.use_triton(None, False, cuda_like)  # fused=False: the reference loop
    assert _triton.use_triton(None, None, cuda_like)
    assert _triton.use_triton(True, None, cpu)  # under the interpreter
    monkeypatch.setattr(_triton, "triton_available", lambda: False)
    monkeypatch.setattr(_triton, "_warned", False)
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert not _triton.use_triton(None, None, cuda_like)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _triton.use_triton(None, None, cuda_like)  # once per process


def test_refused_lists_fall_back_to_the_reference(launches):
    """Parameters sharing memory and complex ones step through the reference loop."""
    base = torch.randn(10)
    shared = [base[:6], base[4:]]
    grads = [torch.ones(6), torch.ones(6)]
    called = []

    def fallback(*args, **kwargs):
        called.append(kwargs)
        sgd_update(*args, **kwargs)

    _triton.triton_sgd_update(
        shared, grads, [], fallback=fallback, lr=0.1, momentum=0.0, dampening=0.0,
        nesterov=False, weight_decay=0.0, decoupled=True,
    )  # fmt: skip
    assert len(called) == 1 and launches["sgd_kernel"] == 0
    complex_param = [torch.randn(4, dtype=torch.complex64)]
    state = [torch.zeros_like(complex_param[0])]
    _triton.triton_adam_update(
        complex_param, [torch.ones_like(complex_param[0])], state, [torch.zeros_like(state[0])],
        [], [torch.tensor(0.0)], fallback=adam_update, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.0, decoupled=True,
    )  # fmt: skip
    assert launches["adam_kernel"] == 0


def test_bench_runs_end_to_end_under_the_interpreter(capsys):
    """``decoupled bench --device cpu --triton``: every row and the training step, tiny."""
    from decoupled.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: on a busy 2-core machine, more threads only spin
    try:
        args = ["bench", "--device", "cpu", "--triton", "--layouts", "resnet50"]
        assert main([*args, "--steps", "1", "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "copy bandwidth" in lines[0] and "whole training step" in lines[-5]
    names = (
        "decoupled triton",
        "decoupled triton bf16",
        "torch AdamW foreach",
        "torch AdamW fused",
    )
    for name in names:  # a layout row and a training-step row each
        rows = [line for line in lines if re.search(re.escape(name) + r" {2,}\d", line)]
        assert len(rows) == 2, (name, lines)
    # int8 moments and compensated bfloat16 θ: a layout row each (none for the tiny model)
    for name in ("decoupled triton int8", "decoupled triton bf16 θ+r", "bf16 θ+r int8"):
        rows = [line for line in lines if re.search(re.escape(name) + r" {2,}\d", line)]
        assert len(rows) == 1, (name, lines)


def test_autograd_notices_the_kernel_changed_a_parameter():
    """The kernel writes through raw pointers; it bumps the version counters as in-place
    operations do, so a backward through a graph that saved θ before the step fails loudly."""
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = decoupled.AdamW([param], triton=True)
    loss = (param * param).sum()  # saves θ for the backward pass
    param.grad = torch.ones(5)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("adam", [True, False], ids=["adam", "sgd"])
def test_grad_scale_unscales_in_the_kernel_and_writes_the_gradients_back(adam, launches):
    """GradScaler's fused protocol: g ← g/scale inside the update, written back, as the
    reference's ``unscale_`` (and torch's fused kernels) do."""
    results = []
    for update in ("reference", "triton"):
        params, grads = make_params(), [g * 8 for g in make_params(seed=4)]
        grads = [g.detach() for g in grads]
        options = {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "decoupled": False,
            "grad_scale": torch.tensor(8.0),
        }
        if adam:
            state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            steps = [torch.tensor(0.0) for _ in params]
            args = (params, grads, *state, steps)
            options |= {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "amsgrad": True}
            function = adam_update if update == "reference" else _triton.triton_adam_update
        else:
            state = [[None] * len(params)]
            args = (params, grads, *state)
            options |= {"momentum": 0.9, "dampening": 0.0, "nesterov": False}
            function = sgd_update if update == "reference" else _triton.triton_sgd_update
        if update == "triton":
            options["fallback"] = None
        with torch.no_grad():
            function(*args, **options)
        results.append([t.detach().clone() for t in params + grads + state[0]])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert launches["adam_kernel" if adam else "sgd_kernel"] == 1


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW], ids=lambda c: c.__name__)
def test_a_gradient_shared_by_two_parameters_is_unscaled_as_in_the_reference_loop(cls, launches):
    """One ``.grad`` tensor given to two parameters (200 elements: several chunks): divided
    once per entry before the launch, as the reference loop does, not once per chunk by
    concurrent programs; θ, the state and .grad after two steps (the moments show the
    gradient's size, which Adam's θ hardly does)."""
    paths = ({"fused": False}, {"triton": True})
    results = [steps_with_a_shared_gradient(cls, 200, **path) for path in paths]
    assert launches["adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"] == 2
    assert len(results[0]) == len(results[1])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(results[1][0], torch.full((200,), 1.0))  # 4096 / 64 / 64


def test_kernels_are_compiled_without_implicit_multiply_adds(launches):
    """Triton fuses a product into a following sum unless told not to (one rounding where the
    reference rounds twice); every launch turns that off, leaving the explicit ``tl.fma``."""
    train(decoupled.AdamW, make_params(), 1, triton=True, state_dtype="int8")
    train(decoupled.SGD, make_params(), 1, triton=True, momentum=0.9)
    for name, options in launches.options.items():
        assert options, name
        assert all(launch["enable_fp_fusion"] is False for launch in options), name


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_stepping_in_backward_equals_backward_then_step(state_dtype):
    """``step_in_backward`` runs the Triton update one parameter at a time, at the rounding
    position ``step()`` gives it: the same parameters and state, bit for bit."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))]
    nets.append(copy.deepcopy(nets[0]))
    optimizers = [
        decoupled.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, triton=True,
                        state_dtype=state_dtype)
        for net in nets
    ]  # fmt: skip
    steps = decoupled.optim.step_in_backward(optimizers[0])
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 5, generator=generator)
        nets[0](x).square().mean().backward()
        nets[1](x).square().mean().backward()
        optimizers[1].step()
        optimizers[1].zero_grad()
    steps.remove()
    assert all(p.grad is None for p in nets[0].parameters())
    assert_same_training_state(*optimizers, *nets)
