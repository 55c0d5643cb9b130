"""``with_decoupled_decay``: decoupled weight decay for any torch optimizer.

Each class is held to the formula θ_t = base_step(θ_{t−1}) − m ⊙ c·(θ_{t−1} − θ₀), computed
here in float64 around a twin of the plain base optimizer (its own decay off), and, where
torch has its own decoupled flag (RAdam, NAdam) or the optimizer decays by itself (a Lion
written here), to that optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch

import decoupled
from decoupled import with_decoupled_decay
from decoupled.diagnostics import DecayMonitor

STEPS = 30
SHAPES = [(6, 4), (9,)]
PEAK_LR = 0.02


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv
    2302.06675, Algorithm 2): θ ← θ·(1 − γλ), then θ ← θ − γ·sign(β1·m + (1 − β1)·g),
    m ← β2·m + (1 − β2)·g."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((beta1 * exp_avg + (1 - beta1) * p.grad).sign(), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def lr_at(step: int) -> float:
    return PEAK_LR * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))


def rate_of(options: dict, lr: float, step: int) -> float:
    """c of ``decay.py``'s table per convention (float64)."""
    if options.get("lambda_norm") is not None:
        weight_decay = options["lambda_norm"] / math.sqrt(options["decay_period"])
    elif callable(options.get("weight_decay")):
        weight_decay = options["weight_decay"](step)
    else:
        weight_decay = options.get("weight_decay", 0.0)
    scale = options.get("decay_scale", "schedule" if "lambda_norm" in options else "lr")
    return {
        "lr": lr * weight_decay,
        "schedule": lr / PEAK_LR * weight_decay,
        "constant": weight_decay,
        "corrected": lr * lr / PEAK_LR * weight_decay,
    }[scale]


def start(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in SHAPES]


def feed(optimizer, params, steps=STEPS, first=0):
    generator = torch.Generator().manual_seed(1)
    for t in range(first + steps):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        if t < first:
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()


def formula(base, base_kwargs: dict, options: dict) -> list[torch.Tensor]:
    """θ after STEPS steps of the module docstring's formula, around a plain ``base``."""
    params = start()
    origin = [p.detach().clone() if options.get("decay_to") == "init" else torch.zeros_like(p)
              for p in params]  # fmt: skip
    optimizer = base(params, lr=PEAK_LR, **base_kwargs)
    generator = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        lr = lr_at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        c = rate_of(options, lr, t + 1)
        with torch.no_grad():
            for p, old, zero in zip(params, before, origin):
                offset = old - zero
                if options.get("cautious"):
                    p.sub_(torch.where((old - p) * offset >= 0, c * offset, 0.0))
                else:
                    p.sub_(c * offset)
    return [p.detach() for p in params]


def relative(ours, expected) -> float:
    a = torch.cat([t.detach().flatten() for t in ours])
    b = torch.cat([t.flatten() for t in expected])
    return ((a - b).abs().max() / b.abs().max()).item()


BASES = [
    pytest.param(torch.optim.RMSprop, {"momentum": 0.5}, id="RMSprop"),
    pytest.param(torch.optim.Adagrad, {}, id="Adagrad"),
    pytest.param(torch.optim.Adafactor, {}, id="Adafactor"),
    pytest.param(torch.optim.NAdam, {}, id="NAdam"),
    pytest.param(torch.optim.RAdam, {}, id="RAdam"),
    pytest.param(Lion, {}, id="Lion"),
]
OPTIONS = [
    pytest.param({"weight_decay": 0.5}, id="lr"),
    pytest.param({"weight_decay": 2.0, "decay_scale": "schedule", "cautious": True},
                 id="schedule-cautious"),  # fmt: skip
    pytest.param({"weight_decay": 0.01, "decay_scale": "constant", "decay_to": "init"},
                 id="constant-init"),  # fmt: skip
    pytest.param({"weight_decay": lambda step: 2.0 / step, "decay_scale": "corrected",
                  "cautious": True, "decay_to": "init"}, id="corrected-schedule-cautious-init"),
    pytest.param({"lambda_norm": 0.5, "decay_period": STEPS}, id="lambda-norm"),
]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("base,base_kwargs", BASES)
def test_the_factory_follows_the_formula(base, base_kwargs, options):
    expected = formula(base, base_kwargs, options)
    undecayed = formula(base, base_kwargs, {"weight_decay": 0.0})
    assert relative(undecayed, expected) > 1e-6  # the decay matters in these runs
    params = start()
    optimizer = with_decoupled_decay(base)(params, lr=PEAK_LR, **base_kwargs, **options)
    feed(optimizer, params)
    assert relative(params, expected) < 1e-12


@pytest.mark.parametrize("base", [torch.optim.RAdam, torch.optim.NAdam])
def test_equals_torchs_own_decoupled_weight_decay(base):
    ours, theirs = start(), start()
    mine = with_decoupled_decay(base)(ours, lr=PEAK_LR, weight_decay=0.3)
    torch_own = base(theirs, lr=PEAK_LR, weight_decay=0.3, decoupled_weight_decay=True)
    feed(mine, ours)
    feed(torch_own, theirs)
    assert relative(ours, theirs) < 1e-12
    for p, q in zip(ours, theirs):
        for key, value in torch_own.state[q].items():
            assert torch.allclose(mine.state[p][key], value, rtol=1e-12, atol=0), key


def test_equals_lions_own_decoupled_decay():
    ours, theirs = start(), start()
    feed(with_decoupled_decay(Lion)(ours, lr=PEAK_LR, weight_decay=0.5), ours)
    feed(Lion(theirs, lr=PEAK_LR, weight_decay=0.5), theirs)
    assert relative(ours, theirs) < 1e-12


def test_the_base_l2_term_is_off_and_lambda_stays_in_the_groups():
    params = start()
    optimizer = with_decoupled_decay(torch.optim.RMSprop)(params, PEAK_LR, 0.99, 1e-8, 0.2)
    assert optimizer.param_groups[0]["weight_decay"] == 0.2  # given positionally
    seen = []
    optimizer.register_step_post_hook(lambda *_: seen.append(1))
    feed(optimizer, params, steps=3)
    assert len(seen) == 3  # the hooks run once per step, around base step and decay
    assert optimizer.param_groups[0]["weight_decay"] == 0.2
    expected = formula(torch.optim.RMSprop, {}, {"weight_decay": 0.2})
    fresh = start()
    feed(with_decoupled_decay(torch.optim.RMSprop)(fresh, PEAK_LR, weight_decay=0.2), fresh)
    assert relative(fresh, expected) < 1e-12


def test_param_groups_no_decay_group_stays_undecayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).double()
    twin.load_state_dict(model.state_dict())
    cls = with_decoupled_decay(torch.optim.Adagrad)
    optimizer = cls(decoupled.param_groups(model, weight_decay=0.5), lr=0.1)
    plain = torch.optim.Adagrad(twin.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # the same gradients for both, whatever the weights
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    assert torch.equal(model[0].bias, twin[0].bias)  # no-decay group: the base alone
    assert torch.equal(model[1].weight, twin[1].weight)  # a norm layer's scale too
    assert not torch.equal(model[0].weight, twin[0].weight)


def test_state_dict_round_trip():
    options = {"weight_decay": lambda step: 1.0 / step, "decay_to": "init", "cautious": True}
    cls = with_decoupled_decay(torch.optim.RMSprop)
    whole = start()
    feed(cls(whole, lr=PEAK_LR, **options), whole)

    split = start()
    first = cls(split, lr=PEAK_LR, **options)
    feed(first, split, steps=STEPS // 2)
    saved = first.state_dict()
    assert set(saved["decay_references"]) == {0, 1}
    assert saved["param_groups"][0]["weight_decay_schedule"] is True
    start_again = start()  # θ₀ must come from the dict, not from these values
    with torch.no_grad():
        for p, q in zip(start_again, split):
            p.copy_(q)
    second = cls(start_again, lr=PEAK_LR, **options)
    second.load_state_dict(saved)
    assert callable(second.param_groups[0]["weight_decay"])
    feed(second, start_again, steps=STEPS - STEPS // 2, first=STEPS // 2)
    assert all(torch.equal(a, b) for a, b in zip(start_again, whole))


def test_a_plain_base_state_dict_loads():
    params = start()
    plain = torch.optim.RMSprop(params, lr=PEAK_LR)
    feed(plain, params, steps=2)
    loaded = with_decoupled_decay(torch.optim.RMSprop)(params, lr=PEAK_LR, weight_decay=0.1)
    loaded.load_state_dict(plain.state_dict())
    group = loaded.param_groups[0]
    assert (group["decay_scale"], group["cautious"], group["decay_to"]) == ("lr", False, "zero")
    feed(loaded, params, steps=1)


def test_skip_nonfinite():
    params = start()
    optimizer = with_decoupled_decay(torch.optim.Adagrad)(
        params, lr=0.1, weight_decay=0.5, skip_nonfinite=True
    )
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full_like(params[0], math.nan)
    params[1].grad = torch.ones_like(params[1])
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert optimizer.param_groups[0]["decay_steps"] == 0


def test_decay_monitor_records_the_decoupled_rate():
    params = start()
    optimizer = with_decoupled_decay(torch.optim.RMSprop)(params, lr=0.01, weight_decay=0.5)
    monitor = DecayMonitor(optimizer, every=1)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    assert len(monitor.records) == 2 * len(params)
    assert all(r.rate_mean == pytest.approx(0.01 * 0.5) for r in monitor.records)


def test_errors():
    with pytest.raises(TypeError, match=r"Invalid OptimizerClass value: 3 \(must be a subclass"):
        with_decoupled_decay(3)
    instance = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(TypeError, match="Invalid OptimizerClass value: SGD \\("):
        with_decoupled_decay(instance)
    with pytest.raises(ValueError, match=r"Invalid OptimizerClass value: Rprop \(it has no "):
        with_decoupled_decay(torch.optim.Rprop)
    with pytest.raises(ValueError, match=r"Invalid OptimizerClass value: decoupled.AdamW"):
        with_decoupled_decay(decoupled.AdamW)
    cls = with_decoupled_decay(torch.optim.RMSprop)
    with pytest.raises(ValueError, match=r"Invalid cautious value: True with weight_decay=0"):
        cls(start(), cautious=True)
    groups = [{"params": start()[:1]}, {"params": start()[1:], "weight_decay": 0.1}]
    assert cls(groups, cautious=True).param_groups[1]["cautious"]  # one group decays: fine
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -0.1"):
        cls(start(), weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"Invalid decay_scale value: 'paper'"):
        cls(start(), weight_decay=0.1, decay_scale="paper")
    with pytest.raises(ValueError, match=r"Invalid cautious value: 'yes'"):
        cls(start(), weight_decay=0.1, cautious="yes")
