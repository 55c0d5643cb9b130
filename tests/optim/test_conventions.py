"""Weight-decay conventions, schedules of λ, decay toward θ₀, and normalized weight decay.

The per-step decay factor is observed directly: with a zero gradient, Adam's and SGD's
updates vanish (m = v = 0, buffer = 0), so each step multiplies θ by exactly (1 − c_t).
Expected values come from float64 formulas written here, independently of the library.
"""

from __future__ import annotations

import math

import pytest
import torch

import decoupled
from decoupled.schedules import CosineWarmRestarts
from tests.helpers import assert_same_training_state, train, twin_models

PEAK_LR, LAMBDA = 0.1, 0.5
WARMUP, T_0, T_MULT, STEPS = 3, 4, 2, 30


def expected_lr(t: int, peak: float = PEAK_LR) -> float:
    """Warm-up then SGDR restarts (T_0=4, T_mult=2), written from the formulas."""
    if t < WARMUP:
        return peak * t / WARMUP
    t -= WARMUP
    length = T_0
    while t >= length:
        t, length = t - length, length * T_MULT
    return 0.5 * peak * (1 + math.cos(math.pi * t / length))


def expected_rate(convention: str, lr: float, peak: float = PEAK_LR, lam: float = LAMBDA) -> float:
    return {
        "lr": lr * lam,
        "schedule": lr / peak * lam,
        "constant": lam,
        "corrected": lr * lr / peak * lam,
    }[convention]


def observed_rates(cls, steps: int, scheduler_fn=None, **kwargs) -> tuple[list[float], list[float]]:
    """Per-step decay rates c_t = 1 − θ_t/θ_{t−1} under zero gradients, and the lrs used."""
    theta = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = cls([theta], **kwargs)
    scheduler = scheduler_fn(optimizer) if scheduler_fn else None
    rates, lrs = [], []
    for _ in range(steps):
        before = theta.detach().clone()
        lrs.append(optimizer.param_groups[0]["lr"])
        theta.grad = torch.zeros_like(theta)
        optimizer.step()
        rates.append(1 - (theta.detach() / before)[0].item())
        if scheduler:
            scheduler.step()
    return rates, lrs


def restarts(optimizer):
    return CosineWarmRestarts(optimizer, T_0=T_0, T_mult=T_MULT, warmup_steps=WARMUP)


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("convention", decoupled.DECAY_SCALES)
def test_decay_factor_sequence_per_convention(cls, convention):
    rates, lrs = observed_rates(
        cls, STEPS, restarts, lr=PEAK_LR, weight_decay=LAMBDA, decay_scale=convention
    )
    for t, (rate, lr) in enumerate(zip(rates, lrs)):
        assert lr == pytest.approx(expected_lr(t), rel=1e-12, abs=1e-15)
        expected = expected_rate(convention, expected_lr(t))
        assert rate == pytest.approx(expected, rel=1e-9, abs=1e-15), (t, lr)


def test_schedule_convention_does_not_depend_on_the_base_lr():
    runs = [
        observed_rates(
            decoupled.AdamW, STEPS, restarts, lr=peak, weight_decay=LAMBDA, decay_scale="schedule"
        )[0]
        for peak in (1e-3, 0.3)
    ]
    assert runs[0] == pytest.approx(runs[1], rel=1e-12, abs=1e-15)
    lr_runs = [
        observed_rates(decoupled.AdamW, STEPS, restarts, lr=peak, weight_decay=LAMBDA)[0]
        for peak in (1e-3, 0.3)
    ]
    assert lr_runs[1][5] == pytest.approx(300 * lr_runs[0][5], rel=1e-9)  # "lr": it does


def test_explicit_lr_convention_is_bit_identical_to_torch():
    from tests.helpers import assert_same_training_state, train, twin_models

    model, model_torch, shape = twin_models("convnet", torch.float32)
    ours = decoupled.AdamW(
        model.parameters(), lr=0.01, weight_decay=0.3, decay_scale="lr", fused=False
    )
    theirs = torch.optim.AdamW(model_torch.parameters(), lr=0.01, weight_decay=0.3, foreach=False)
    train(model, ours, shape, 50, torch.float32, scheduler=restarts(ours))
    train(model_torch, theirs, shape, 50, torch.float32, scheduler=restarts(theirs))
    assert_same_training_state(ours, theirs, model, model_torch)


def test_peak_lr_is_max_lr_then_initial_lr_then_construction_lr():
    def first_rate(**kwargs):
        scheduler_fn = kwargs.pop("scheduler_fn", None)
        return observed_rates(decoupled.AdamW, 1, scheduler_fn, **kwargs)[0][0]

    base = dict(weight_decay=LAMBDA, decay_scale="schedule")
    assert first_rate(lr=0.05, **base) == pytest.approx(LAMBDA)  # α = construction lr
    assert first_rate(lr=0.05, max_lr=0.2, **base) == pytest.approx(LAMBDA * 0.05 / 0.2)
    # OneCycleLR records initial_lr = max_lr/div_factor and starts there; it also sets max_lr
    one_cycle = dict(scheduler_fn=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1.0, 10))
    assert first_rate(lr=0.05, **one_cycle, **base) == pytest.approx(LAMBDA * 0.04 / 1.0)
    # a scheduler that records initial_lr but no max_lr: α = initial_lr
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = decoupled.AdamW([theta], lr=0.05, **base)
    optimizer.param_groups[0]["initial_lr"] = 0.5
    theta.grad = torch.zeros_like(theta)
    optimizer.step()
    assert 1 - theta.item() == pytest.approx(LAMBDA * 0.05 / 0.5)


def test_an_lr_above_the_peak_is_refused_with_the_fix():
    """CyclicLR records its lowest lr as initial_lr: dividing by it would decay up to
    max_lr/base_lr times too fast (η_t > 1). The step raises, naming max_lr; with max_lr
    given, c = (γ_t/α)·λ."""
    make_cyclic = lambda o: torch.optim.lr_scheduler.CyclicLR(  # noqa: E731
        o, base_lr=0.001, max_lr=0.01, step_size_up=5, cycle_momentum=False
    )
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = decoupled.AdamW([theta], lr=0.01, weight_decay=0.5, decay_scale="schedule")
    scheduler = make_cyclic(optimizer)
    theta.grad = torch.zeros_like(theta)
    optimizer.step()  # lr = base_lr = initial_lr: fine
    scheduler.step()
    before = theta.detach().clone()
    with pytest.raises(
        ValueError, match=r"Invalid max_lr value: None: the lr 0\.0028.* initial_lr"
    ):
        optimizer.step()
    assert torch.equal(theta.detach(), before)

    rates, lrs = observed_rates(
        decoupled.AdamW, 8, make_cyclic, lr=0.01, weight_decay=0.5, decay_scale="schedule",
        max_lr=0.01,
    )  # fmt: skip
    for rate, lr in zip(rates, lrs):
        assert rate == pytest.approx(lr / 0.01 * 0.5, rel=1e-9)


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW, decoupled.Adam, decoupled.SGD])
def test_weight_decay_schedule_callable(cls):
    """A schedule step -> λ equals setting the group's λ by hand before each step (bit for
    bit, every state tensor), and step t receives λ(t) counted from 1."""
    model, model_hand, shape = twin_models("mlp", torch.float64)
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls in (decoupled.SGD, decoupled.SGDW) else {}
    scheduled = cls(model.parameters(), weight_decay=lambda step: 0.1 * step, **kwargs)
    by_hand = cls(model_hand.parameters(), weight_decay=0.0, **kwargs)
    for step in range(1, 6):
        by_hand.param_groups[0]["weight_decay"] = 0.1 * step
        train(model, scheduled, shape, 1, torch.float64, seed=step)
        train(model_hand, by_hand, shape, 1, torch.float64, seed=step)
    assert_same_training_state(scheduled, by_hand, model, model_hand)
    assert scheduled.param_groups[0]["decay_steps"] == 5


def test_weight_decay_schedule_returning_a_bad_value_names_it():
    theta = torch.nn.Parameter(torch.ones(1))
    optimizer = decoupled.AdamW([theta], weight_decay=lambda step: -0.5)
    theta.grad = torch.zeros_like(theta)
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -0.5 .* at step 1"):
        optimizer.step()
    assert theta.item() == 1.0  # nothing changed


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_decay_to_init_pulls_toward_the_initial_values(cls):
    theta0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    optimizer = cls([theta], lr=0.1, weight_decay=0.5, decay_to="init")
    with torch.no_grad():
        theta.add_(1.0)  # moved away from θ₀ after the optimizer was built
    for step in range(1, 11):
        theta.grad = torch.zeros_like(theta)
        optimizer.step()
        torch.testing.assert_close(
            theta.detach() - theta0, torch.full((3,), 0.95**step, dtype=torch.float64)
        )
    state = optimizer.state_dict()["state"][0]
    torch.testing.assert_close(state["init_param"], theta0, rtol=0, atol=0)


def test_adam_l2_toward_init_is_l2_on_the_shifted_problem():
    """Adam with decay_to='init' on θ equals torch Adam + L2 on φ = θ − θ₀ (float64)."""
    torch.manual_seed(0)
    theta0, target = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    phi = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    ours = decoupled.Adam([theta], lr=0.05, weight_decay=0.3, decay_to="init")
    reference = torch.optim.Adam([phi], lr=0.05, weight_decay=0.3, foreach=False)
    for _ in range(50):
        for param, optimizer, offset in ((theta, ours, 0.0), (phi, reference, theta0)):
            optimizer.zero_grad()
            ((param + offset - target) ** 2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(theta.detach() - theta0, phi.detach(), rtol=1e-10, atol=1e-12)


def test_reset_decay_reference_takes_current_values():
    theta = torch.nn.Parameter(torch.zeros(2))
    optimizer = decoupled.AdamW([theta], decay_to="init")
    with torch.no_grad():
        theta.fill_(3.0)  # e.g. pretrained weights loaded after building the optimizer
    optimizer.reset_decay_reference()
    assert torch.equal(optimizer.state[theta]["init_param"], torch.full((2,), 3.0))


def test_lambda_norm_is_recomputed_for_each_restart_period():
    lambda_norm = 0.05
    rates, lrs = observed_rates(
        decoupled.AdamW,
        STEPS,
        restarts,
        lr=PEAK_LR,
        lambda_norm=lambda_norm,
        decay_scale="schedule",
    )
    for t, rate in enumerate(rates):
        if t < WARMUP:
            period = T_0
        else:
            s, period = t - WARMUP, T_0
            while s >= period:
                s, period = s - period, period * T_MULT
        lam = lambda_norm / math.sqrt(period)
        assert rate == pytest.approx(expected_lr(t) / PEAK_LR * lam, rel=1e-9, abs=1e-15), t


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_lambda_norm_is_in_the_papers_schedule_units_by_default(cls):
    """λ_norm = 0.05 with 100 steps decays by η_t·0.05/sqrt(100) per step (the paper), not by
    γ_t·0.005: decay_scale defaults to "schedule" with lambda_norm, to "lr" without."""
    rates, _ = observed_rates(cls, 3, lr=1e-3, lambda_norm=0.05, decay_period=100)
    assert rates == pytest.approx([0.005] * 3, rel=1e-9)
    rates, _ = observed_rates(cls, 1, lr=1e-3, lambda_norm=0.05, decay_period=100, decay_scale="lr")
    assert rates == pytest.approx([1e-3 * 0.005], rel=1e-9)
    assert cls([torch.nn.Parameter(torch.ones(1))]).param_groups[0]["decay_scale"] == "lr"


def test_lambda_norm_without_a_period_is_a_clear_error():
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = decoupled.AdamW([theta], lambda_norm=0.05)
    theta.grad = torch.zeros_like(theta)
    with pytest.raises(ValueError, match="lambda_norm needs the length of the run"):
        optimizer.step()
    optimizer.param_groups[0]["decay_period"] = 100
    optimizer.step()
    assert 1 - theta.item() == pytest.approx(0.05 / 10)  # η = 1 at the construction lr


def test_state_dict_round_trip_keeps_decay_options_and_reference():
    theta = torch.nn.Parameter(torch.ones(2))
    optimizer = decoupled.SGDW(
        [theta], lr=0.1, weight_decay=0.1, decay_scale="schedule", decay_to="init", max_lr=0.2
    )
    theta.grad = torch.ones_like(theta)
    optimizer.step()
    restored = decoupled.SGDW([theta], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    group = restored.param_groups[0]
    assert (group["decay_scale"], group["decay_to"], group["max_lr"]) == ("schedule", "init", 0.2)
    assert torch.equal(restored.state[theta]["init_param"], torch.ones(2))


CONVENTION_ERRORS = [
    (decoupled.AdamW, {"decay_scale": "paper"}, ValueError, r"Invalid decay_scale value: 'paper'"),
    (decoupled.SGDW, {"decay_to": "one"}, ValueError, r"Invalid decay_to value: 'one'"),
    (decoupled.AdamW, {"lambda_norm": -1.0}, ValueError, r"Invalid lambda_norm value: -1.0"),
    (decoupled.AdamW, {"decay_period": 0}, ValueError, r"Invalid decay_period value: 0"),
    (decoupled.AdamW, {"max_lr": math.nan}, ValueError, r"Invalid max_lr value: nan"),
    (decoupled.Adam, {"decay_scale": "schedule"}, TypeError, r"decay_scale: only for decoupled"),
    (decoupled.SGD, {"lambda_norm": 0.05}, TypeError, r"lambda_norm: only for decoupled"),
]


@pytest.mark.parametrize("cls,kwargs,error,regex", CONVENTION_ERRORS)
def test_convention_errors(cls, kwargs, error, regex):
    with pytest.raises(error, match=regex):
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_group_level_values_are_checked_too():
    with pytest.raises(ValueError, match=r"Invalid decay_scale value: 'lr2'"):
        decoupled.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "decay_scale": "lr2"}])
