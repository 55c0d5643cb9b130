"""What the optimizers compute: hand-checked steps, a float64 SGDW reference, convergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import decoupled
from tests.helpers import OptimizerInput


def two_steps_on_half_square(optimizer_cls, **kwargs) -> list[float]:
    """θ0 = 1 on f(θ) = θ²/2 (so g = θ); return [θ1, θ2]."""
    theta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_cls([theta], **kwargs)
    values = []
    for _ in range(2):
        optimizer.zero_grad()
        (0.5 * theta.pow(2)).sum().backward()
        optimizer.step()
        values.append(theta.item())
    return values


def test_hand_checked_sgd_l2():
    # λ=0.5, γ=0.1, μ=0.9.  g1 = 1 + 0.5·1 = 1.5, b1 = 1.5, θ1 = 1 − 0.15 = 0.85
    # g2 = 0.85·1.5 = 1.275, b2 = 0.9·1.5 + 1.275 = 2.625, θ2 = 0.85 − 0.2625 = 0.5875
    got = two_steps_on_half_square(decoupled.SGD, lr=0.1, momentum=0.9, weight_decay=0.5)
    assert got == pytest.approx([0.85, 0.5875], rel=1e-14)


def test_hand_checked_sgdw():
    # λ=0.5, γ=0.1, μ=0.9.  g1 = 1, θ ← 1·(1 − 0.05) = 0.95, b1 = 1, θ1 = 0.95 − 0.1 = 0.85
    # g2 = 0.85, θ ← 0.85·0.95 = 0.8075, b2 = 0.9 + 0.85 = 1.75, θ2 = 0.8075 − 0.175 = 0.6325
    got = two_steps_on_half_square(decoupled.SGDW, lr=0.1, momentum=0.9, weight_decay=0.5)
    assert got == pytest.approx([0.85, 0.6325], rel=1e-14)


def test_hand_checked_adam_l2():
    # λ=0.5, γ=0.1, β=(0.9, 0.999), ε=1e-8.
    # g1 = 1.5; m̂1 = 1.5, v̂1 = 2.25 -> θ1 = 1 − 0.1·1.5/1.5 = 0.9 (up to ε)
    # g2 = 1.5·0.9 = 1.35; m2 = 0.135 + 0.135 = 0.27, m̂2 = 0.27/0.19 = 1.421052631578947
    # v2 = 0.999·0.00225 + 0.001·1.8225 = 0.00407025, v̂2 = 0.00407025/0.001999 = 2.036143071535768
    # θ2 = 0.9 − 0.1·1.421052631578947/1.426934851889100 = 0.800412227671...
    got = two_steps_on_half_square(decoupled.Adam, lr=0.1, weight_decay=0.5)
    assert got == pytest.approx([0.9, 0.8004122277], abs=5e-9)  # ε moves θ by ~1e-9


def test_hand_checked_adamw():
    # λ=0.5, γ=0.1.  θ ← 1·0.95; g1 = 1 (taken at θ0): m̂1 = 1, v̂1 = 1 -> θ1 = 0.95 − 0.1 = 0.85
    # g2 = 0.85, θ ← 0.85·0.95 = 0.8075; m2 = 0.09 + 0.085 = 0.175, m̂2 = 0.175/0.19
    # v2 = 0.000999 + 0.0007225 = 0.0017215, v̂2 = 0.0017215/0.001999 = 0.861180590295148
    # θ2 = 0.8075 − 0.1·0.921052631578947/0.927998162872722 = 0.708248442353...
    got = two_steps_on_half_square(decoupled.AdamW, lr=0.1, weight_decay=0.5)
    assert got == pytest.approx([0.85, 0.7082484424], abs=5e-9)


SGDW_INPUTS = [
    OptimizerInput({"lr": 0.05, "weight_decay": 0.1}, "no momentum"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "weight_decay": 0.2}, "momentum"),
    OptimizerInput({"lr": 0.02, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.5}, "damp"),
    OptimizerInput({"lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, "nag"),
    OptimizerInput({"lr": 0.03, "momentum": 0.9, "maximize": True, "weight_decay": 0.1}, "max"),
]


def sgdw_reference(
    theta0,
    grad_fn,
    steps,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
):
    """SGDW in float64 NumPy, written from the paper's Algorithm 1 with torch's momentum."""
    theta, buf = theta0.astype(np.float64).copy(), None
    for _ in range(steps):
        g = grad_fn(theta) * (-1.0 if maximize else 1.0)
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            direction = g + momentum * buf if nesterov else buf
        else:
            direction = g
        theta = theta * (1 - lr * weight_decay) - lr * direction
    return theta, buf


@pytest.mark.parametrize("inp", SGDW_INPUTS, ids=repr)
def test_sgdw_matches_float64_formula(inp):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    hessian, target = a @ a.T / 7 + np.eye(7), rng.normal(size=7)
    sign = -1.0 if inp.kwargs.get("maximize") else 1.0

    def grad_fn(theta):  # gradient of sign·½(θ−t)ᵀH(θ−t)
        return sign * hessian @ (theta - target)

    theta0 = rng.normal(size=7)
    expected, expected_buf = sgdw_reference(theta0, grad_fn, 150, **inp.kwargs)
    theta = torch.tensor(theta0, requires_grad=True)
    optimizer = decoupled.SGDW([theta], **inp.kwargs)
    for _ in range(150):
        theta.grad = torch.from_numpy(grad_fn(theta.detach().numpy()))
        optimizer.step()
    np.testing.assert_allclose(theta.detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    if expected_buf is not None:
        np.testing.assert_allclose(
            optimizer.state[theta]["momentum_buffer"].numpy(), expected_buf, rtol=1e-12, atol=1e-14
        )


def test_sgdw_equals_sgd_l2_only_without_momentum():
    """Proposition 1: for plain SGD, decoupled λ equals L2 λ (lr-scaled decay); with momentum
    the L2 term accumulates in the buffer and the two differ."""
    plain = [
        two_steps_on_half_square(cls, lr=0.1, weight_decay=0.5)
        for cls in (decoupled.SGD, decoupled.SGDW)
    ]
    assert plain[0] == pytest.approx(plain[1], rel=1e-14)
    heavy = [
        two_steps_on_half_square(cls, lr=0.1, momentum=0.9, weight_decay=0.5)
        for cls in (decoupled.SGD, decoupled.SGDW)
    ]
    assert abs(heavy[0][1] - heavy[1][1]) > 1e-3


def rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


CONVERGENCE = [
    (decoupled.Adam, {"lr": 0.02}),
    (decoupled.AdamW, {"lr": 0.02, "weight_decay": 0.0}),
    (decoupled.SGD, {"lr": 5e-4, "momentum": 0.9}),
    (decoupled.SGDW, {"lr": 5e-4, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}),
]


@pytest.mark.parametrize("cls,kwargs", CONVERGENCE, ids=lambda v: getattr(v, "__name__", ""))
def test_converges_on_rosenbrock(cls, kwargs):
    xy = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    optimizer = cls([xy], **kwargs)
    for _ in range(8000):
        optimizer.zero_grad()
        rosenbrock(xy).backward()
        optimizer.step()
    assert rosenbrock(xy).item() < 1e-3
    assert torch.allclose(xy.detach(), torch.ones(2, dtype=torch.float64), atol=0.05)


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW, decoupled.SGD, decoupled.SGDW])
def test_converges_to_the_regularized_minimum_of_a_quadratic(cls):
    """f = ½‖θ − t‖², each optimizer's known fixed point.

    L2 (Adam, SGD): the minimizer of f + (λ/2)‖θ‖², θ* = t/(1 + λ).
    SGDW: at rest θ = θ(1 − γλ) − γ(θ − t)/(1 − μ), so θ* = t/(1 + λ(1 − μ)).
    AdamW: the minimizer of f subject to ‖θ‖∞ ≤ 1/λ (Xie & Li 2024, SCIENCE.md §5), here t.
    """
    target = torch.tensor([2.0, -0.5, 0.3], dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    lam = 0.25
    kwargs = {"lr": 0.01, "weight_decay": lam}
    if cls in (decoupled.SGD, decoupled.SGDW):
        kwargs["momentum"] = 0.5
    if cls is decoupled.AdamW:
        kwargs["betas"] = (0.9, 0.99)  # a shorter memory of v lets the step shrink in time
    optimizer = cls([theta], **kwargs)
    for _ in range(6000):
        optimizer.zero_grad()
        (0.5 * (theta - target).pow(2)).sum().backward()
        optimizer.step()
    final = theta.detach()
    if cls is decoupled.AdamW:
        # |t| < 1/λ = 4, so the constraint is inactive and AdamW ends at t itself
        torch.testing.assert_close(final, target, atol=2e-3, rtol=0)
    elif cls is decoupled.SGDW:
        torch.testing.assert_close(final, target / (1 + lam * 0.5), atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(final, target / (1 + lam), atol=2e-3, rtol=0)
    assert math.isfinite(final.sum().item())
