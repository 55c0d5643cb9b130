"""Conversions between conventions, the rules for choosing λ, and the lr schedules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import decoupled
from decoupled import (
    convert_weight_decay,
    normalized_weight_decay,
    timescale,
    weight_decay_for_timescale,
)
from decoupled.schedules import CosineWarmRestarts, WarmupCosine


@pytest.mark.parametrize("src,dst", list(itertools.permutations(decoupled.DECAY_SCALES, 2)))
@pytest.mark.parametrize("lr,max_lr", [(1e-3, None), (3e-4, 1e-3), (0.1, 0.4)])
def test_conversion_round_trips_and_preserves_the_per_step_decay(src, dst, lr, max_lr):
    value = 0.037
    converted = convert_weight_decay(value, src, dst, lr, max_lr)
    assert convert_weight_decay(converted, dst, src, lr, max_lr) == pytest.approx(value, rel=1e-12)
    alpha = lr if max_lr is None else max_lr
    per_step = {"lr": lr, "schedule": lr / alpha, "constant": 1.0, "corrected": lr * lr / alpha}
    assert value * per_step[src] == pytest.approx(converted * per_step[dst], rel=1e-12)


def test_conversion_examples_from_the_science_notes():
    # λ_lr = λ_schedule/α ; λ_constant = α·λ_lr at γ = α
    assert convert_weight_decay(0.05, "schedule", "lr", lr=1e-3) == pytest.approx(50.0)
    assert convert_weight_decay(0.01, "lr", "constant", lr=1e-3) == pytest.approx(1e-5)


@pytest.mark.parametrize("src,dst", [("l2", "lr"), ("schedule", "l2")])
def test_l2_to_decoupled_is_refused_with_the_reason(src, dst):
    with pytest.raises(ValueError, match=r"divides the L2 term .* Proposition 2"):
        convert_weight_decay(0.1, src, dst, lr=1e-3)


@pytest.mark.parametrize(
    "kwargs,regex",
    [
        ({"src": "paper"}, r"Invalid src value: 'paper'"),
        ({"lr": 0.0}, r"Invalid lr value: 0.0"),
        ({"max_lr": -1.0}, r"Invalid max_lr value: -1.0"),
    ],
)
def test_conversion_errors(kwargs, regex):
    args = {"value": 0.1, "src": "lr", "dst": "schedule", "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=regex):
        convert_weight_decay(**args)


def test_normalized_weight_decay_formula_and_the_papers_five_times_example():
    assert normalized_weight_decay(0.05, 128, 50_000, 100) == pytest.approx(
        0.05 * math.sqrt(128 / (50_000 * 100))
    )
    # ImageNet32x32 has ~24x more examples per epoch than CIFAR-10: raw λ ~5x too large
    cifar = normalized_weight_decay(0.05, 128, 50_000, 100)
    imagenet32 = normalized_weight_decay(0.05, 128, 24 * 50_000, 100)
    assert cifar / imagenet32 == pytest.approx(math.sqrt(24))  # the paper's "about 5x"


def test_timescale_rule_and_its_inverse():
    lam = weight_decay_for_timescale(5.0, lr=1e-3, batch_size=128, dataset_size=50_000)
    assert lam == pytest.approx(128 / (1e-3 * 5.0 * 50_000))
    assert timescale(lam, lr=1e-3, batch_size=128, dataset_size=50_000) == pytest.approx(5.0)
    for convention in decoupled.DECAY_SCALES:
        value = weight_decay_for_timescale(5.0, 1e-3, 128, 50_000, convention, max_lr=2e-3)
        assert timescale(value, 1e-3, 128, 50_000, convention, max_lr=2e-3) == pytest.approx(5.0)
    assert timescale(0.0, 1e-3, 128, 50_000) == math.inf
    # halving N at fixed lr doubles the λ that keeps τ_epoch (SCIENCE.md §8, prediction 5)
    half = weight_decay_for_timescale(5.0, 1e-3, 128, 25_000)
    assert half == pytest.approx(2 * lam)


@pytest.mark.parametrize("name,value", [("batch_size", -1), ("dataset_size", 0), ("lr", math.inf)])
def test_rule_errors_name_the_value(name, value):
    args = {"tau_epochs": 5.0, "lr": 1e-3, "batch_size": 128, "dataset_size": 1000, name: value}
    with pytest.raises(ValueError, match=f"Invalid {name} value: {value}"):
        weight_decay_for_timescale(**args)


def test_rules_take_numpy_numbers_and_refuse_non_numbers():
    import numpy as np

    lam = weight_decay_for_timescale(5.0, np.float32(1e-3), np.int64(128), np.int64(50_000))
    assert lam == pytest.approx(128 / (1e-3 * 5.0 * 50_000), rel=1e-6)
    assert normalized_weight_decay(np.float64(0.05), 128, 50_000, 100) > 0
    with pytest.raises(ValueError, match=r"Invalid lambda_norm value: 'a'"):
        normalized_weight_decay("a", 128, 50_000, 100)
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: None"):
        timescale(None, 1e-3, 128, 50_000)


def lr_sequence(scheduler_fn, steps, optimizer_cls=torch.optim.SGD, lr=0.1):
    optimizer = optimizer_cls([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_fn(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("T_0,T_mult,eta_min", [(5, 1, 0.0), (3, 2, 1e-3), (7, 3, 0.01)])
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, decoupled.SGDW])
def test_warm_restarts_equal_torch_where_they_overlap(T_0, T_mult, eta_min, optimizer_cls):
    ours = lr_sequence(lambda o: CosineWarmRestarts(o, T_0, T_mult, eta_min), 60, optimizer_cls)
    theirs = lr_sequence(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min),
        60,
        optimizer_cls,
    )
    assert ours == theirs


@pytest.mark.parametrize("T_0", [1, 3, 10])
@pytest.mark.parametrize("T_mult", [1, 2, 3])
def test_warm_restart_periods_follow_the_definition_at_any_step(T_0, T_mult):
    """Each period T_mult times the last, walked period by period, equals the closed form,
    also a billion steps in (where walking would take T_0 = 1, T_mult = 1 a billion loops)."""

    def walked(step):
        position, length = step, T_0
        while position >= length:
            position, length = position - length, length * T_mult
        return position, length

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = CosineWarmRestarts(optimizer, T_0=T_0, T_mult=T_mult)
    far = [10**6 + 1] + ([123_456_789] if T_mult > 1 else [])  # walking is slow for T_mult 1
    for step in [*range(3000), *far]:
        assert scheduler.period(step) == walked(step), step
    if T_mult == 1:
        assert scheduler.period(10**9 + 7) == ((10**9 + 7) % T_0, T_0)


def test_schedules_take_numpy_integers():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    restarts = CosineWarmRestarts(optimizer, T_0=np.int64(10), T_mult=np.int32(2))
    assert type(restarts.T_0) is int and restarts.period(25) == (15, 20)
    cosine = WarmupCosine(optimizer, np.int64(2), np.int64(10))
    assert type(cosine.total_steps) is int


def test_warm_restarts_with_warmup_then_the_same_restarts():
    plain = lr_sequence(lambda o: CosineWarmRestarts(o, 4, 2), 30)
    warm = lr_sequence(lambda o: CosineWarmRestarts(o, 4, 2, warmup_steps=5), 35)
    assert warm[:5] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert warm[5:] == plain


def test_restart_points_match_the_papers_example():
    scheduler = CosineWarmRestarts(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), 100, 2)
    restarts = [t for t in range(1, 1600) if scheduler.period(t)[0] == 0]
    assert restarts == [100, 300, 700, 1500]


def test_warmup_cosine_formula():
    lrs = lr_sequence(lambda o: WarmupCosine(o, warmup_steps=4, total_steps=14, eta_min=0.01), 20)
    for t, lr in enumerate(lrs):
        if t < 4:
            expected = 0.1 * t / 4
        else:
            progress = min(t - 4, 10) / 10
            expected = 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), t
    assert lrs[-1] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "factory,regex",
    [
        (lambda o: WarmupCosine(o, warmup_steps=-1, total_steps=10), "Invalid warmup_steps"),
        (lambda o: WarmupCosine(o, warmup_steps=20, total_steps=10), "Invalid total_steps"),
        (lambda o: CosineWarmRestarts(o, T_0=0), "Invalid T_0 value: 0"),
        (lambda o: CosineWarmRestarts(o, T_0=5, T_mult=0), "Invalid T_mult value: 0"),
        (lambda o: CosineWarmRestarts(o, T_0=5, eta_min=-1.0), "Invalid eta_min value: -1.0"),
    ],
)
def test_schedule_errors(factory, regex):
    with pytest.raises(ValueError, match=regex):
        factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
