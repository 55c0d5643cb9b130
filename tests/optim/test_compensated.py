"""Compensated bfloat16/float16 weights (``_compensated.py``): the stall test, one step against
a float64 implementation of the formula, state dicts, bad values refused."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim._compensated import _unit, master
from decoupled.optim._int8 import decode

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.py

_spec = importlib.util.spec_from_file_location(
    "stall", Path(__file__).parents[2] / "benchmarks" / "stall.py"
)
stall = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stall)


def test_compensated_bfloat16_tracks_float32_where_plain_bfloat16_stalls():
    steps, n = 300, 1024
    start = stall.run(torch.float32, steps=0, n=n)
    reference = stall.run(torch.float32, steps, n=n)
    moved = (reference - start).norm()

    def relative(theta):
        return ((theta - start).norm() / moved).item(), ((theta - reference).norm() / moved).item()

    for state in (None, "int8"):
        compensated = relative(stall.run(torch.bfloat16, steps, n=n, state_dtype=state))
        plain = relative(stall.run(torch.bfloat16, steps, n=n, state_dtype=state, compensate=False))
        assert 0.95 < compensated[0] < 1.05 and compensated[1] < 0.2  # measured 1.00, 0.12
        assert plain[0] < 0.2 and plain[1] > 0.8  # measured 0.09, 1.00: stalled


def float64_adamw(w, grad, m, v, step, lr, weight_decay, decoupled_, init=None):
    offset = w.float() if init is None else w.float() - init.float()
    if not decoupled_:  # g + λ(w − w₀) in float32, as the step forms it: where they cancel,
        grad = grad.float().add(offset, alpha=weight_decay)  # the update hangs on its rounding
    w, grad, m, v = (t.double() for t in (w, grad, m, v))
    if decoupled_:
        w = w - lr * weight_decay * offset.double()
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad * grad
    return w - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)


def assert_master_within_a_unit(theta, state, dtype, expected, before):
    """θ kept in ``dtype`` with an int8 remainder whose master weight is ``expected`` (float64)
    to one remainder unit (ulp(θ)/256) and float32 rounding. The float32 step rounds on the
    scale of the weight ``before`` it: where the update nearly cancels it (θ crossing zero),
    those roundings outweigh the unit of the small result."""
    assert theta.dtype == dtype and state["param_remainder"].dtype == torch.int8
    after = master(theta.detach(), state["param_remainder"]).double()
    unit = _unit(theta.detach()).double()
    scale = torch.maximum(expected.abs(), before.double().abs())
    assert ((after - expected).abs() <= unit + 1e-6 * scale).all()


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    decoupled_=st.booleans(),
    decay_to=st.sampled_from(["zero", "init"]),
    state_dtype=st.sampled_from([None, "int8"]),
    shape=st.sampled_from([(5,), (300,), (8, 17)]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_each_step_is_the_float32_update_of_the_master_weight(
    dtype, decoupled_, decay_to, state_dtype, shape, steps, seed
):
    """The master weight θ + r·ulp(θ)/256 after a step equals the float64 formula applied to
    the one before (with the moments the step read), to one remainder unit."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
    cls = decoupled.AdamW if decoupled_ else decoupled.Adam
    optimizer = cls([theta], lr=1e-3, weight_decay=0.1, state_dtype=state_dtype, decay_to=decay_to)
    init = theta.detach().clone() if decay_to == "init" else None
    for _ in range(steps):
        theta.grad = torch.randn(shape, generator=generator).to(dtype)
        state = optimizer.state[theta]
        if "step" in state:
            w = master(theta.detach(), state["param_remainder"])
            if state_dtype == "int8":
                m = decode(state["exp_avg"], state["exp_avg_scale"], "exp_avg")
                v = decode(state["exp_avg_sq"], state["exp_avg_sq_scale"], "exp_avg_sq")
            else:
                m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
            count = float(state["step"]) + 1
        else:
            w, m, v, count = theta.detach().float(), *[torch.zeros(shape)] * 2, 1.0
        expected = float64_adamw(w, theta.grad.float(), m, v, count, 1e-3, 0.1, decoupled_, init)
        optimizer.step()
        assert_master_within_a_unit(theta, optimizer.state[theta], dtype, expected, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_moments_in_thetas_dtype_follow_the_float64_recursion(dtype):
    """Compensated θ keeps its moments in θ's dtype (as torch does) while the step computes in
    float32: float16 moments are rounded to nearest, bfloat16 ones stochastically, so after
    each step they are the float64 moving averages (of the same gradients) to a few roundings
    of their dtype (float16's subnormals, below 2⁻¹⁴, are spaced 2⁻²⁴ apart)."""
    generator = torch.Generator().manual_seed(5)
    theta = torch.nn.Parameter(torch.randn(4096, generator=generator).to(dtype))
    optimizer = decoupled.AdamW([theta], lr=1e-3, weight_decay=0.1)
    exact = [torch.zeros(4096, dtype=torch.float64)] * 2
    largest = [torch.zeros(4096, dtype=torch.float64)] * 2  # each rounding errs by its ulp
    ulp, spacing = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * 2**-10
    for step in range(1, 6):
        theta.grad = torch.randn(4096, generator=generator).to(dtype)
        g = theta.grad.double()
        exact = [0.9 * exact[0] + 0.1 * g, 0.999 * exact[1] + 0.001 * g * g]
        largest = [torch.maximum(big, value.abs()) for big, value in zip(largest, exact)]
        optimizer.step()
        state = optimizer.state[theta]
        assert state["exp_avg"].dtype == dtype
        for key, value, big in zip(("exp_avg", "exp_avg_sq"), exact, largest):
            error = (state[key].double() - value).abs()
            assert (error <= step * (ulp * big + spacing)).all(), key


def test_remainder_is_kept_in_the_state_dict_and_loads_through_torch():
    theta = torch.nn.Parameter(torch.linspace(-2, 2, 64).bfloat16())
    optimizer = decoupled.AdamW([theta], lr=1e-4)
    for step in range(5):
        theta.grad = torch.full_like(theta, 0.1 * (step + 1))
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    remainder = saved["state"][0]["param_remainder"]
    assert remainder.dtype == torch.int8 and remainder.abs().sum() > 0
    weight = master(theta.detach(), remainder)
    again = decoupled.AdamW([theta], lr=1e-4)
    again.load_state_dict(copy.deepcopy(saved))  # torch casts it to θ's dtype; we cast back
    theta.grad = torch.zeros_like(theta)
    again._init_state(again.param_groups[0], theta)
    assert torch.equal(again.state[theta]["param_remainder"], remainder)
    assert torch.equal(master(theta.detach(), again.state[theta]["param_remainder"]), weight)
    plain = decoupled.AdamW([theta], lr=1e-4, compensate=False)
    plain.load_state_dict(copy.deepcopy(saved))
    plain.step()
    assert "param_remainder" not in plain.state[theta]
    saved["state"][0]["param_remainder"] = remainder[:10]
    with pytest.raises(ValueError, match="Invalid state for parameter 0 .*param_remainder shape"):
        again.load_state_dict(saved)


def test_float32_parameters_and_compensate_false_keep_no_remainder():
    float32, bfloat16 = torch.ones(4), torch.ones(4).bfloat16()
    for theta, options in ((float32, {}), (bfloat16, {"compensate": False})):
        theta = torch.nn.Parameter(theta)
        optimizer = decoupled.AdamW([theta], **options)
        theta.grad = torch.ones_like(theta)
        optimizer.step()
        assert "param_remainder" not in optimizer.state[theta]


@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [
        (decoupled.AdamW, torch.optim.AdamW, {"lr": 1e-2}),
        (decoupled.SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
        (decoupled.SGDW, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    ],
    ids=["AdamW", "SGD", "SGDW"],
)
def test_compensate_false_is_torchs_bfloat16_update_bit_for_bit(ours, theirs, options):
    """Plain bfloat16 θ steps as torch.optim's single-tensor loop; its state (SGD's momentum
    buffer included) stays in bfloat16."""
    generator = torch.Generator().manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(300, generator=generator).bfloat16())
    torchs = torch.nn.Parameter(mine.detach().clone())
    optimizers = [ours([mine], compensate=False, **options),
                  theirs([torchs], foreach=False, **options)]  # fmt: skip
    for _ in range(10):
        mine.grad = torch.randn(300, generator=generator).bfloat16()
        torchs.grad = mine.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(mine, torchs)
    assert all(t.dtype == torch.bfloat16 for t in optimizers[0].state[mine].values() if t.dim())


def test_invalid_compensate_names_the_value():
    with pytest.raises(ValueError, match="Invalid compensate value: 'yes'"):
        decoupled.AdamW([torch.nn.Parameter(torch.zeros(1))], compensate="yes")


def test_asking_for_triton_keeps_compensation_and_int8_moments():
    """The Triton kernel keeps the remainder and int8 codes (``test_triton_compact.py``):
    triton=True leaves ``compensate`` and ``state_dtype`` as given."""
    param = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    for compensate in (None, True, False):
        optimizer = decoupled.AdamW([param], triton=True, compensate=compensate)
        assert optimizer.param_groups[0]["compensate"] is compensate
    optimizer = decoupled.AdamW([param], triton=True, state_dtype="int8")
    assert optimizer.param_groups[0]["state_dtype"] == torch.int8
