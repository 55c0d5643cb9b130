"""DecayMonitor on cautious weight decay (arXiv 2510.12402) and on ``with_decoupled_decay``'s
optimizers: the share of each tensor's elements decayed and the rate per element (c on them,
0 elsewhere), against masks computed here from the rule u_i·θ_i ≥ 0."""

from __future__ import annotations

import pytest
import torch

import decoupled
from decoupled.diagnostics import DecayMonitor

SHAPES = [(8, 5), (13,)]
LR, WEIGHT_DECAY = 0.01, 0.5


def start():
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]


def direction(optimizer, param, group):
    """u of the step just taken, read as the rule defines it (not through the library)."""
    state = optimizer.state[param]
    if "exp_avg" in state:
        return state["exp_avg"]
    buffer = state["momentum_buffer"]
    return param.grad + group["momentum"] * buffer if group["nesterov"] else buffer


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ps: decoupled.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY,
                                                cautious=True), id="AdamW"),
        pytest.param(lambda ps: decoupled.SGDW(ps, lr=LR, momentum=0.9, nesterov=True,
                                               weight_decay=WEIGHT_DECAY, cautious=True),
                     id="SGDW-nesterov"),
    ],
)  # fmt: skip
def test_fraction_and_rates_of_cautious_decay(make):
    params = start()
    optimizer = make(params)
    monitor = DecayMonitor(optimizer, every=1)
    generator = torch.Generator().manual_seed(1)
    expected = []
    for step in range(1, 4):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        group = optimizer.param_groups[0]
        for j, (p, old) in enumerate(zip(params, before)):
            mask = direction(optimizer, p, group).sign() * old.sign() >= 0
            expected.append((step, f"group0.param{j}", mask.double().mean().item()))
    recorded = monitor.decayed_fractions
    assert [(f.step, f.tensor) for f in recorded] == [(s, t) for s, t, _ in expected]
    assert [f.fraction for f in recorded] == pytest.approx([f for _, _, f in expected], abs=1e-12)
    assert all(0 < f < 1 for _, _, f in expected)  # mixed masks: the test can fail
    rate = LR * WEIGHT_DECAY
    for record, (_, _, fraction) in zip(monitor.records, expected):
        assert record.rate_mean == pytest.approx(rate * fraction, rel=1e-6)  # c in float32
        for value in (record.rate_p5, record.rate_p50, record.rate_p95):
            assert value == 0.0 or value == pytest.approx(rate, rel=1e-6)


def test_plain_adamw_has_no_fractions_and_a_uniform_rate():
    params = start()
    optimizer = decoupled.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    monitor = DecayMonitor(optimizer, every=1)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert monitor.decayed_fractions == []
    assert {r.rate_cv for r in monitor.records} == {0.0}


def test_factory_optimizer_with_cautious_decay():
    params = start()
    optimizer = decoupled.with_decoupled_decay(torch.optim.RMSprop)(
        params, lr=LR, weight_decay=WEIGHT_DECAY, cautious=True
    )
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.RMSprop(twin, lr=LR)  # the base step alone gives u
    monitor = DecayMonitor(optimizer, every=1)
    generator = torch.Generator().manual_seed(1)
    for p, q in zip(params, twin):
        p.grad = torch.randn(p.shape, generator=generator)
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in params]
    optimizer.step()
    plain.step()
    for j, (old, stepped) in enumerate(zip(before, twin)):
        mask = (old - stepped.detach()).sign() * old.sign() >= 0
        fraction = monitor.decayed_fractions[j]
        assert fraction.fraction == pytest.approx(mask.double().mean().item())
        assert 0 < fraction.fraction < 1
        assert monitor.records[j].rate_mean == pytest.approx(LR * WEIGHT_DECAY * fraction.fraction)
