"""Compensated bfloat16/float16 weights for SGD and SGDW (``_compensated.py``): each step against
a float64 implementation of the formula on the master weight, the stall test, state dicts,
routing to the reference loop, bad values refused."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim._compensated import init_remainder, master

from .test_compensated import assert_master_within_a_unit
from .test_compensated_kernel import run_twins

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.py

_spec = importlib.util.spec_from_file_location(
    "stall", Path(__file__).parents[2] / "benchmarks" / "stall.py"
)
stall = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stall)

LR, WEIGHT_DECAY, MAX_LR = 1e-3, 0.1, 4e-3
# c per step for each decay_scale (decay.py's table), with γ = LR and α = MAX_LR
RATES = {
    "lr": LR * WEIGHT_DECAY,
    "schedule": LR / MAX_LR * WEIGHT_DECAY,
    "constant": WEIGHT_DECAY,
    "corrected": LR**2 / MAX_LR * WEIGHT_DECAY,
}


def float64_sgd(w, buffer, grad, options, init, first):
    """One step of SGD/SGDW (the box of ``decoupled.SGD``) in float64 on the master weight w;
    returns (w, b). The L2 gradient is formed in float32, as the step forms it: where g and
    λ(w − w₀) cancel, the update hangs on its rounding."""
    grad = -grad if options.get("maximize") else grad
    offset = w if init is None else w - init.float()
    decoupled_ = options["cls"] is decoupled.SGDW
    if not decoupled_:
        grad = grad.add(offset, alpha=WEIGHT_DECAY)
    w, grad, offset = w.double(), grad.double(), offset.double()
    rate = RATES[options.get("decay_scale", "lr")]
    if decoupled_ and not options.get("cautious"):
        w = w - rate * offset
    momentum, dampening = options.get("momentum", 0.0), options.get("dampening", 0.0)
    direction = grad
    if momentum:
        buffer = grad if first else momentum * buffer.double() + (1 - dampening) * grad
        direction = grad + momentum * buffer if options.get("nesterov") else buffer
    if options.get("cautious"):  # decay only where d and w − w₀ agree in sign
        w = w - rate * offset * (direction * offset >= 0)
    return w - LR * direction, buffer


CASES = [
    {"cls": decoupled.SGD},
    {"cls": decoupled.SGD, "momentum": 0.9, "dampening": 0.1},
    {"cls": decoupled.SGD, "momentum": 0.9, "nesterov": True, "decay_to": "init"},
    {"cls": decoupled.SGDW, "momentum": 0.9, "maximize": True},
    {"cls": decoupled.SGDW, "momentum": 0.5, "nesterov": True, "decay_scale": "schedule"},
    {"cls": decoupled.SGDW, "momentum": 0.9, "dampening": 0.5, "decay_scale": "constant"},
    {"cls": decoupled.SGDW, "decay_scale": "corrected", "decay_to": "init"},
    {"cls": decoupled.SGDW, "momentum": 0.9, "cautious": True, "decay_scale": "constant"},
]


def _case_name(options):
    for key, value in options.items():
        yield value.__name__ if key == "cls" else f"{key}={value}"


def _optimizer(theta, options, **extra):
    kwargs = {k: v for k, v in options.items() if k != "cls"} | extra
    if kwargs.get("decay_scale") in ("schedule", "corrected"):
        kwargs["max_lr"] = MAX_LR
    return options["cls"]([theta], lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(_case_name(o)))
def test_each_step_is_the_float32_update_of_the_master_weight(options, dtype):
    """Over 25 steps, each step's master weight θ + r·ulp(θ)/256 equals the float64 formula
    applied to the one before, to one remainder unit, and the float32 momentum buffer equals
    the formula's to float32 rounding."""
    generator = torch.Generator().manual_seed(len(str(options)))
    shape = (7, 19)
    theta = torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
    optimizer = _optimizer(theta, options)
    init = theta.detach().clone() if options.get("decay_to") == "init" else None
    moved = torch.zeros(shape, dtype=torch.float64)
    for step in range(25):
        theta.grad = torch.randn(shape, generator=generator).to(dtype)
        state = optimizer.state[theta]
        w = master(theta.detach(), state["param_remainder"]) if step else theta.detach().float()
        buffer = state.get("momentum_buffer")
        expected, expected_buffer = float64_sgd(
            w, buffer, theta.grad.float(), options, init, first=step == 0
        )
        optimizer.step()
        state = optimizer.state[theta]
        assert_master_within_a_unit(theta, state, dtype, expected, w)
        if options.get("momentum"):
            assert state["momentum_buffer"].dtype == torch.float32
            torch.testing.assert_close(
                state["momentum_buffer"].double(), expected_buffer, rtol=1e-6, atol=1e-7
            )
        else:
            assert "momentum_buffer" not in state or state["momentum_buffer"] is None
        moved += (master(theta.detach(), state["param_remainder"]).double() - w.double()).abs()
    # the updates, about LR·|g| each, are mostly below half a bfloat16 ulp: kept only in r
    assert (moved > 0).float().mean() > 0.99


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compensated_sgdw_tracks_float32_where_plain_bfloat16_stalls(momentum):
    steps, n = 300, 1024
    options = {"algorithm": "sgdw", "momentum": momentum, "lr": 1e-3 if momentum else 1e-2}
    start = stall.run(torch.float32, steps=0, n=n, **options)
    reference = stall.run(torch.float32, steps, n=n, **options)
    moved = (reference - start).norm()

    def relative(theta):
        return ((theta - start).norm() / moved).item(), ((theta - reference).norm() / moved).item()

    compensated = relative(stall.run(torch.bfloat16, steps, n=n, **options))
    plain = relative(stall.run(torch.bfloat16, steps, n=n, compensate=False, **options))
    # measured (moved, distance): μ = 0 (1.001, 0.015), μ = 0.9 (1.004, 0.071)
    assert 0.95 < compensated[0] < 1.05 and compensated[1] < 0.15
    # measured: μ = 0 (0.04, 1.00), μ = 0.9 (0.24, 0.95): stalled
    assert plain[0] < 0.35 and plain[1] > 0.8


def _trained(cls=decoupled.SGDW, steps=5, lr=1e-4, **options):
    theta = torch.nn.Parameter(torch.linspace(-2, 2, 64).bfloat16())
    optimizer = cls([theta], lr=lr, momentum=0.9, weight_decay=0.1, **options)
    for step in range(steps):
        theta.grad = torch.full_like(theta, 0.1 * (step + 1))
        optimizer.step()
    return theta, optimizer


def test_a_state_dict_round_trip_continues_bit_for_bit():
    """θ, the int8 remainder and the float32 buffer load unchanged (torch would round the
    buffer to bfloat16), and both optimizers then take the same steps."""
    theta, optimizer = _trained()
    saved = copy.deepcopy(optimizer.state_dict())
    state = saved["state"][0]
    assert state["param_remainder"].dtype == torch.int8 and state["param_remainder"].any()
    assert state["momentum_buffer"].dtype == torch.float32
    twin = torch.nn.Parameter(theta.detach().clone())
    again = decoupled.SGDW([twin], lr=1e-4, momentum=0.9, weight_decay=0.1)
    again.load_state_dict(copy.deepcopy(saved))
    assert again.state[twin]["momentum_buffer"].dtype == torch.float32
    for step in range(3):
        for p, opt in ((theta, optimizer), (twin, again)):
            p.grad = torch.full_like(p, -0.05 * step)
            opt.step()
    assert torch.equal(theta, twin)
    for key in ("param_remainder", "momentum_buffer"):
        assert torch.equal(optimizer.state[theta][key], again.state[twin][key])


def test_the_state_dict_loads_through_torch_and_into_plain_bfloat16():
    """SGD (L2, as torch.optim.SGD reads the saved group)."""
    theta, optimizer = _trained(decoupled.SGD, lr=1e-2)
    saved = copy.deepcopy(optimizer.state_dict())
    remainder = saved["state"][0]["param_remainder"]
    weight = master(theta.detach(), remainder)
    # through torch.optim.SGD, which casts the remainder to bfloat16: whole numbers survive
    torch_optimizer = torch.optim.SGD([theta], momentum=0.9)
    torch_optimizer.load_state_dict(copy.deepcopy(saved))
    again = decoupled.SGD([theta], momentum=0.9)
    again.load_state_dict(torch_optimizer.state_dict())
    state = again.state[theta]
    assert state["param_remainder"].dtype == torch.bfloat16  # cast back at the next step
    init_remainder(again.param_groups[0]["compensate"], theta, state)
    assert torch.equal(state["param_remainder"], remainder)
    assert torch.equal(master(theta.detach(), state["param_remainder"]), weight)
    # compensate=False: the remainder is dropped and the buffer is θ's dtype, as torch's
    plain_theta = torch.nn.Parameter(theta.detach().clone())
    plain = decoupled.SGD([plain_theta], momentum=0.9, compensate=False)
    plain.load_state_dict(copy.deepcopy(saved))
    torch_theta = torch.nn.Parameter(theta.detach().clone())
    torch_optimizer = torch.optim.SGD([torch_theta], momentum=0.9, foreach=False)
    torch_optimizer.load_state_dict(copy.deepcopy(saved))
    for p, opt in ((plain_theta, plain), (torch_theta, torch_optimizer)):
        p.grad = torch.full_like(p, 0.3)
        opt.step()
    assert "param_remainder" not in plain.state[plain_theta]
    assert plain.state[plain_theta]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(plain_theta, torch_theta)
    assert torch.equal(
        plain.state[plain_theta]["momentum_buffer"],
        torch_optimizer.state[torch_theta]["momentum_buffer"],
    )


def test_a_damaged_remainder_is_refused_by_name():
    theta, optimizer = _trained(decoupled.SGD)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["param_remainder"] = saved["state"][0]["param_remainder"][:10]
    with pytest.raises(ValueError, match="Invalid state for parameter 0 .*param_remainder shape"):
        optimizer.load_state_dict(saved)
    saved["state"][0]["param_remainder"] = torch.full((64,), 0.5)
    with pytest.raises(ValueError, match="param_remainder = fractions"):
        optimizer.load_state_dict(saved)
    saved["state"][0]["param_remainder"] = torch.full((64,), 128.0)  # would wrap to -128
    with pytest.raises(ValueError, match=r"param_remainder = 128.0 \(must be within int8"):
        optimizer.load_state_dict(saved)
    saved["state"][0]["param_remainder"] = torch.zeros(64, dtype=torch.int16)
    with pytest.raises(ValueError, match="param_remainder dtype = torch.int16"):
        optimizer.load_state_dict(saved)


def test_compensated_groups_take_the_kernel_that_keeps_the_remainder(path_log):
    """A compensated group steps in the C++ kernel (fused=True too: torch has no fused SGD that
    would keep the remainder); a group mixing float32 and bfloat16 θ, and fused=False, in the
    reference loop; compensate=False bfloat16 θ as torch.optim, in the reference loop."""
    low, high = torch.nn.Parameter(torch.ones(4).bfloat16()), torch.nn.Parameter(torch.ones(4))
    cases = [
        ([low], {}, "kernel_sgd_update"),
        ([low], {"fused": True}, "kernel_sgd_update"),
        ([low], {"fused": False}, "sgd_update"),
        ([low, high], {}, "sgd_update"),
        ([high], {}, "kernel_sgd_update"),
        ([low], {"compensate": False}, "sgd_update"),
    ]
    for cls in (decoupled.SGD, decoupled.SGDW):
        for params, options, expected in cases:
            optimizer = cls(params, lr=0.1, momentum=0.9, **options)
            path_log.clear()
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer.step()
            assert path_log == [expected], (cls, options)
            compensated = params[0] is low and options.get("compensate") is not False
            assert ("param_remainder" in optimizer.state[low]) == compensated
            assert "param_remainder" not in optimizer.state[high]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    decoupled_=st.booleans(),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.5]),
    nesterov=st.booleans(),
    decay=st.booleans(),
    decay_to=st.sampled_from(["zero", "init"]),
    maximize=st.booleans(),
    cautious=st.booleans(),
    shapes=st.lists(st.sampled_from([(1,), (63,), (65,), (3, 300), (4, 8, 3, 3)]), max_size=3),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
)
def test_the_kernel_equals_the_reference_loop_bit_for_bit(
    path_log, dtype, decoupled_, momentum, dampening, nesterov, decay, decay_to, maximize,
    cautious, shapes, layout,
):  # fmt: skip
    """θ (as bits), its remainder and the float32 buffer after 8 steps, every option. (The
    buffer's values: a buffer is laid out like θ in the kernel and like the first gradient in
    the reference loop, as for float32 θ.)"""
    nesterov = nesterov and momentum > 0 and dampening == 0
    options = {"lr": 0.05, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
               "maximize": maximize, "decay_to": decay_to, "weight_decay": 0.1 * decay}  # fmt: skip
    cls = decoupled.SGDW if decoupled_ else decoupled.SGD
    if decoupled_:
        options["cautious"] = cautious
    path_log.clear()
    fast, reference, fast_params, reference_params = run_twins(
        cls, options, shapes or [(300,)], dtype, steps=8, layout=layout
    )
    assert path_log == ["kernel_sgd_update", "sgd_update"] * 8
    for p_f, p_r in zip(fast_params, reference_params):
        assert torch.equal(p_f.detach().view(torch.int16), p_r.detach().view(torch.int16))
        s_f, s_r = fast.state[p_f], reference.state[p_r]
        assert s_f.keys() == s_r.keys() and "param_remainder" in s_r
        for key, value in s_r.items():
            assert (value is None) == (s_f[key] is None), key
            assert value is None or torch.equal(s_f[key], value), key


def test_sparse_gradients_take_the_same_compensated_step_as_dense_ones():
    rows = torch.tensor([0, 3, 5, 2])  # distinct: a bfloat16 dense sum would round
    values = torch.linspace(-1, 1, 4 * 3).view(4, 3).bfloat16()
    sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (6, 3), check_invariants=True)
    thetas = [torch.nn.Parameter(torch.linspace(-1, 1, 18).view(6, 3).bfloat16()) for _ in "ab"]
    optimizers = [decoupled.SGDW([t], lr=1e-3, momentum=0.9, weight_decay=0.1) for t in thetas]
    for _ in range(3):
        thetas[0].grad, thetas[1].grad = sparse.clone(), sparse.to_dense()
        for optimizer in optimizers:
            optimizer.step()
    states = [optimizer.state[t] for optimizer, t in zip(optimizers, thetas)]
    assert torch.equal(thetas[0], thetas[1])
    assert torch.equal(states[0]["param_remainder"], states[1]["param_remainder"])
    assert torch.equal(states[0]["momentum_buffer"].to_dense(), states[1]["momentum_buffer"])


def test_float32_and_differentiable_steps_keep_no_remainder():
    """Differentiable steps record torch's operations on θ itself (a non-leaf, as torch
    requires), uncompensated."""
    leaf = torch.ones(4).bfloat16().requires_grad_()
    for theta, options in (
        (torch.nn.Parameter(torch.ones(4)), {}),
        (leaf.clone(), {"differentiable": True}),
    ):
        optimizer = decoupled.SGDW([theta], lr=0.5, momentum=0.9, **options)
        theta.grad = torch.ones_like(theta)
        optimizer.step()
        assert "param_remainder" not in optimizer.state[theta]
        assert optimizer.state[theta]["momentum_buffer"].dtype == theta.dtype
        assert torch.equal(theta.detach().float(), torch.full((4,), 0.5))


@pytest.mark.parametrize("cls", [decoupled.SGD, decoupled.SGDW], ids=lambda c: c.__name__)
def test_bad_compensate_values_are_refused_by_name(cls):
    param = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid compensate value: 'yes'"):
        cls([param], compensate="yes")
    with pytest.raises(ValueError, match="Invalid compensate value: 1 "):
        cls([param], compensate=1)
    for compensate in (None, True, False):  # the Triton kernel keeps the remainder too
        assert (
            cls([param], triton=True, compensate=compensate).param_groups[0]["compensate"]
            is compensate
        )
    assert cls([param]).param_groups[0]["compensate"] is None


def test_a_checkpoint_of_compensated_weights_loads_into_float32_ones():
    """A float32 model takes the remainder-free state: the float32 buffer as it was saved."""
    theta, optimizer = _trained()
    saved = copy.deepcopy(optimizer.state_dict())
    wide = torch.nn.Parameter(theta.detach().float())
    again = decoupled.SGDW([wide], lr=1e-4, momentum=0.9, weight_decay=0.1)
    again.load_state_dict(saved)
    assert "param_remainder" not in again.state[wide]
    assert torch.equal(again.state[wide]["momentum_buffer"], saved["state"][0]["momentum_buffer"])
