"""The effective decay rate per element, its summaries, and the angle between tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import decoupled
from decoupled.diagnostics import angle_between, element_decay_rates, spearman
from decoupled.diagnostics.rates import average_ranks, decay_kind, summarize_rates
from decoupled.diagnostics.theory import angle_of_update

LR, WEIGHT_DECAY, EPS = 0.01, 0.1, 1e-8


def step_with(optimizer, param, grad):
    param.grad = grad.clone()
    optimizer.step()


def test_adam_l2_rate_is_lr_lambda_over_sqrt_v_hat_after_known_gradients():
    theta0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    grads = [
        torch.tensor([0.1, 1.0, -10.0, 0.01], dtype=torch.float64),
        torch.tensor([-0.2, 0.5, 5.0, 0.02], dtype=torch.float64),
    ]
    beta1, beta2 = 0.9, 0.99
    param = theta0.clone().requires_grad_()
    optimizer = decoupled.Adam([param], lr=LR, betas=(beta1, beta2), eps=EPS, weight_decay=0.1)
    # by hand: L2 enters the gradient before the moments: g ← g + λθ
    theta, v = theta0.clone(), torch.zeros(4, dtype=torch.float64)
    m = torch.zeros(4, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        step_with(optimizer, param, grad)
        g = grad + WEIGHT_DECAY * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_hat = v / (1 - beta2**t)
        theta = theta - LR * (m / (1 - beta1**t)) / (v_hat.sqrt() + EPS)
        rates, rms = element_decay_rates(optimizer, param)
        torch.testing.assert_close(rms, v_hat.sqrt())
        torch.testing.assert_close(rates, LR * WEIGHT_DECAY / (v_hat.sqrt() + EPS))
    torch.testing.assert_close(param.detach(), theta)


def test_amsgrad_uses_the_running_maximum():
    param = torch.ones(2, dtype=torch.float64, requires_grad=True)
    optimizer = decoupled.Adam([param], lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=True)
    step_with(optimizer, param, torch.tensor([10.0, 0.0], dtype=torch.float64))
    step_with(optimizer, param, torch.tensor([0.0, 0.0], dtype=torch.float64))
    state = optimizer.state[param]
    v_hat_max = state["max_exp_avg_sq"] / (1 - 0.999**2)
    rates, _ = element_decay_rates(optimizer, param)
    torch.testing.assert_close(rates, LR * WEIGHT_DECAY / (v_hat_max.sqrt() + 1e-8))
    assert not torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: decoupled.AdamW(p, lr=LR, weight_decay=WEIGHT_DECAY), LR * WEIGHT_DECAY),
        (lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WEIGHT_DECAY), LR * WEIGHT_DECAY),
        (
            lambda p: decoupled.AdamW(
                p, lr=LR, weight_decay=WEIGHT_DECAY, decay_scale="schedule", max_lr=0.1
            ),
            (LR / 0.1) * WEIGHT_DECAY,
        ),
        (lambda p: decoupled.SGDW(p, lr=LR, weight_decay=WEIGHT_DECAY), LR * WEIGHT_DECAY),
        (lambda p: decoupled.SGD(p, lr=LR, momentum=0.9, weight_decay=0.1), LR * WEIGHT_DECAY),
        (lambda p: torch.optim.SGD(p, lr=LR, weight_decay=WEIGHT_DECAY), LR * WEIGHT_DECAY),
        (lambda p: decoupled.Adam(p, lr=LR, weight_decay=0.0), 0.0),
    ],
    ids=["AdamW", "torch AdamW", "AdamW schedule", "SGDW", "SGD+L2", "torch SGD", "no decay"],
)
def test_uniform_rates(make, expected):
    param = torch.randn(50, requires_grad=True)
    optimizer = make([param])
    step_with(optimizer, param, torch.logspace(-4, 2, 50))
    rates, _ = element_decay_rates(optimizer, param)
    assert isinstance(rates, float) and rates == pytest.approx(expected, rel=1e-12)
    summary = summarize_rates(rates, None)
    assert summary["rate_p5"] == summary["rate_p95"] == rates
    assert math.isnan(summary["rate_grad_rms_spearman"])
    if expected > 0:
        assert summary["rate_cv"] == 0.0  # exactly: every element decays alike
    else:
        assert math.isnan(summary["rate_cv"])


@pytest.mark.parametrize(
    "cls,options",
    [
        (decoupled.SGD, {}),
        (decoupled.SGD, {"momentum": 0.9}),
        (decoupled.SGD, {"momentum": 0.9, "dampening": 0.5}),
        (decoupled.SGD, {"momentum": 0.9, "nesterov": True}),
        (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3}),
    ],
    ids=["plain", "momentum", "dampening", "nesterov", "torch-dampening"],
)
@pytest.mark.parametrize("steps", [1, 2, 6, 300], ids=lambda t: f"step-{t}")
def test_sgd_l2_rate_is_what_the_l2_term_removes_through_the_buffer(cls, options, steps):
    """Measured, not derived: two runs take the same gradients, one with L2 and one without,
    and both are put back at θ₀ after every step, so that the L2 term is the same λθ₀ each
    time; the difference after step t, over θ₀, is the whole L2 share the step applied."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64)
    params = [torch.nn.Parameter(theta.clone()) for _ in range(2)]
    with_l2 = cls([params[0]], lr=0.1, weight_decay=0.01, **options)
    without_l2 = cls([params[1]], lr=0.1, weight_decay=0.0, **options)
    for _ in range(steps):
        grad = torch.randn(6, dtype=torch.float64)
        for param in params:
            param.data.copy_(theta)
        step_with(with_l2, params[0], grad)
        step_with(without_l2, params[1], grad)
    removed = (params[1].detach() - params[0].detach()) / theta
    rate, _ = element_decay_rates(with_l2, params[0])
    if cls is torch.optim.SGD and steps < 300:
        pytest.skip("torch's SGD groups do not say which step it is: read as steady state")
    torch.testing.assert_close(removed, torch.full_like(removed, rate), rtol=1e-9, atol=0)
    if options.get("momentum") and steps == 300:  # (1 − τ)/(1 − μ): 10× at μ = 0.9
        damped = 1 - options.get("dampening", 0.0)
        share = 1 + 0.9 * damped / 0.1 if options.get("nesterov") else damped / 0.1
        assert rate == pytest.approx(0.1 * 0.01 * share, rel=1e-9)


def test_decay_kinds():
    param = [torch.zeros(1, requires_grad=True)]
    kinds = {
        "Adam": decoupled.Adam(param),
        "AdamW": decoupled.AdamW(param),
        "torch.AdamW": torch.optim.AdamW(param),
        "torch.Adam": torch.optim.Adam(param),
        "SGDW": decoupled.SGDW(param),
    }
    labels = {name: (decay_kind(opt).family, decay_kind(opt).label) for name, opt in kinds.items()}
    assert labels == {
        "Adam": ("adam", "L2"),
        "AdamW": ("adam", "decoupled"),
        "torch.AdamW": ("adam", "decoupled"),
        "torch.Adam": ("adam", "L2"),
        "SGDW": ("sgd", "decoupled"),
    }
    with pytest.raises(TypeError, match="RMSprop"):
        decay_kind(torch.optim.RMSprop(param))


def test_adam_l2_decay_falls_with_gradient_size():
    """Elements with very different gradient scales: rank correlation with sqrt(v̂) ≈ −1."""
    torch.manual_seed(0)
    scales = torch.logspace(-3, 1, 400)
    param = torch.randn(400, requires_grad=True)
    optimizer = decoupled.Adam([param], lr=1e-3, weight_decay=1e-2)
    for _ in range(5):
        step_with(optimizer, param, scales * torch.randn(400))
    rates, rms = element_decay_rates(optimizer, param)
    summary = summarize_rates(rates, rms)
    assert summary["rate_grad_rms_spearman"] < -0.9
    assert summary["rate_cv"] > 1  # far from uniform
    assert summary["rate_p5"] < summary["rate_p50"] < summary["rate_p95"]
    assert summary["rate_mean"] == pytest.approx(float(rates.double().mean()))


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    np.testing.assert_allclose(average_ranks(x), rankdata(x))
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    z = rng.normal(size=300)  # no ties: the fast path
    np.testing.assert_allclose(average_ranks(z), rankdata(z))
    w = z**3 + rng.normal(size=300)
    assert spearman(z, w) == pytest.approx(spearmanr(z, w).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize(
    "a, b, angle",
    [
        ([1.0, 0.0, 0.0], [0.0, 3.0, 0.0], math.pi / 2),  # orthogonal
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 0.0),  # parallel, other length
        ([1.0, 2.0], [-1.0, -2.0], math.pi),  # opposite
        ([1.0, 0.0], [math.cos(0.3), math.sin(0.3)], 0.3),  # a known angle
        ([2.0, 0.0], [5 * math.cos(1e-7), 5 * math.sin(1e-7)], 1e-7),  # tiny: acos fails here
    ],
)
def test_angle_between(a, b, angle):
    a64, b64 = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert angle_between(a64, b64) == pytest.approx(angle, rel=1e-7, abs=1e-15)
    assert angle_between(a64.reshape(-1, 1), b64.reshape(1, -1)) == pytest.approx(
        angle, rel=1e-7, abs=1e-15
    )


def test_angle_of_a_zero_tensor_is_nan_and_random_angles_match_acos():
    assert math.isnan(angle_between(torch.zeros(3), torch.ones(3)))
    assert math.isnan(angle_between(torch.ones(3), torch.zeros(3)))
    torch.manual_seed(1)
    a = torch.randn(1000, dtype=torch.float64)
    b = a + 0.1 * torch.randn(1000, dtype=torch.float64)  # far enough from 0 for acos
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert angle_between(a, b) == pytest.approx(math.acos(cosine), rel=1e-9)
    assert angle_of_update(a, b - a) == pytest.approx(math.acos(cosine), rel=1e-9)


def test_rates_from_compact_state_are_computed_in_float32():
    """bfloat16 moments are read in float32 (as the step reads them), not divided in bfloat16
    arithmetic, which would be off by up to 0.8%."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1000))
    optimizer = decoupled.Adam([param], lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16)
    for _ in range(5):
        step_with(optimizer, param, torch.randn(1000) * torch.logspace(-3, 1, 1000))
    rates, rms = element_decay_rates(optimizer, param)
    assert rates.dtype == rms.dtype == torch.float32
    v_hat = optimizer.state[param]["exp_avg_sq"].double() / (1 - 0.999**5)
    expected = 1e-2 * 0.1 / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(rates.double(), expected, rtol=1e-6, atol=0)
