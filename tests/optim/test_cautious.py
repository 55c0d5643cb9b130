"""Cautious weight decay (CWD; Chen, Li, Liang et al., arXiv 2510.12402) on AdamW and SGDW.

The rule: decay coordinate i only where ``u_i·(θ_i − θ₀_i) ≥ 0``, u being the direction the
step subtracts (AdamW m̂/(sqrt(v̂)+ε), SGDW d_t), then take the usual step. Each path is held
to a float64 implementation of that formula written here from the paper (not from the
library), over many steps and every decay convention; the fast paths are also compared with
the reference loop in ``optim_db.py``'s CWD rows (``test_fast_paths.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

import decoupled
from decoupled.optim import _kernels

STEPS = 40
SHAPES = [(7, 5), (33,), (1,)]
PEAK_LR = 0.05


def lr_at(step: int) -> float:
    """A cosine from the peak, so that every convention's rate changes each step."""
    return PEAK_LR * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))


def rate_of(options: dict, lr: float, step: int) -> float:
    """c of ``decay.py``'s table, written out per convention (float64)."""
    if "lambda_norm" in options:
        weight_decay = options["lambda_norm"] / math.sqrt(options["decay_period"])
    elif callable(options["weight_decay"]):
        weight_decay = options["weight_decay"](step)
    else:
        weight_decay = options["weight_decay"]
    default_scale = "schedule" if "lambda_norm" in options else "lr"
    scale = options.get("decay_scale", default_scale)
    return {
        "lr": lr * weight_decay,
        "schedule": lr / PEAK_LR * weight_decay,
        "constant": weight_decay,
        "corrected": lr * lr / PEAK_LR * weight_decay,
    }[scale]


def gradient_stream(shapes, dtype):
    generator = torch.Generator().manual_seed(3)
    while True:
        yield [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]


def start_params(dtype, shapes=SHAPES):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]


def formula_adamw_cwd(options: dict) -> tuple[list, list, list]:
    """(θ, m, v) after STEPS steps of AdamW + CWD in float64, from the paper's rule."""
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    eps, amsgrad = options.get("eps", 1e-8), options.get("amsgrad", False)
    sign = -1.0 if options.get("maximize") else 1.0
    params = start_params(torch.float64)
    origin = [p.clone() if options.get("decay_to") == "init" else torch.zeros_like(p)
              for p in params]  # fmt: skip
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    v_max = [torch.zeros_like(p) for p in params]
    stream = gradient_stream(SHAPES, torch.float64)
    for t in range(1, STEPS + 1):
        lr, grads = lr_at(t - 1), next(stream)
        c = rate_of(options, lr, t)
        for i, theta in enumerate(params):
            g = sign * grads[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            v_max[i] = torch.maximum(v_max[i], v[i])
            v_hat = (v_max[i] if amsgrad else v[i]) / (1 - beta2**t)
            u = m[i] / (1 - beta1**t) / (v_hat.sqrt() + eps)
            offset = theta - origin[i]
            mask = (u * offset >= 0).double()
            params[i] = theta - mask * c * offset - lr * u
    return params, m, v


def formula_sgdw_cwd(options: dict) -> tuple[list, list]:
    """(θ, b) after STEPS steps of SGDW + CWD in float64, from the paper's rule."""
    momentum, dampening = options.get("momentum", 0.0), options.get("dampening", 0.0)
    nesterov = options.get("nesterov", False)
    sign = -1.0 if options.get("maximize") else 1.0
    params = start_params(torch.float64)
    origin = [p.clone() if options.get("decay_to") == "init" else torch.zeros_like(p)
              for p in params]  # fmt: skip
    buffers = [None] * len(params)
    stream = gradient_stream(SHAPES, torch.float64)
    for t in range(1, STEPS + 1):
        lr, grads = lr_at(t - 1), next(stream)
        c = rate_of(options, lr, t)
        for i, theta in enumerate(params):
            g = sign * grads[i]
            direction = g
            if momentum:
                buffers[i] = g if t == 1 else momentum * buffers[i] + (1 - dampening) * g
                direction = g + momentum * buffers[i] if nesterov else buffers[i]
            offset = theta - origin[i]
            mask = (direction * offset >= 0).double()
            params[i] = theta - mask * c * offset - lr * direction
    return params, buffers


def run_library(cls, options: dict, dtype, fused, grads_of=None):
    """(optimizer, params) after STEPS steps on the same gradients and lr schedule."""
    params = [p.requires_grad_() for p in start_params(dtype)]
    optimizer = cls(params, lr=PEAK_LR, fused=fused, cautious=True, **options)
    stream = gradient_stream(SHAPES, dtype)
    for t in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t)
        grads = next(stream) if grads_of is None else grads_of(params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return optimizer, params


ADAMW_ROWS = [
    pytest.param({"weight_decay": 0.5}, id="lr"),
    pytest.param({"weight_decay": 5.0, "decay_scale": "schedule"}, id="schedule"),
    pytest.param({"weight_decay": 0.01, "decay_scale": "constant"}, id="constant"),
    pytest.param({"weight_decay": 8.0, "decay_scale": "corrected"}, id="corrected"),
    pytest.param({"weight_decay": lambda step: 1.0 / step**0.5}, id="lambda-schedule"),
    pytest.param({"lambda_norm": 2.0, "decay_period": STEPS}, id="lambda-norm"),
    pytest.param({"weight_decay": 2.0, "decay_to": "init", "amsgrad": True}, id="init-amsgrad"),
    pytest.param({"weight_decay": 0.5, "maximize": True, "betas": (0.5, 0.9)}, id="maximize"),
]
SGDW_ROWS = [
    pytest.param({"weight_decay": 0.5}, id="plain"),
    pytest.param({"weight_decay": 0.5, "momentum": 0.9}, id="momentum"),
    pytest.param({"weight_decay": 5.0, "momentum": 0.9, "decay_scale": "schedule"}, id="schedule"),
    pytest.param(
        {"weight_decay": 0.02, "momentum": 0.5, "dampening": 0.3, "decay_scale": "constant"},
        id="constant-damp",
    ),  # fmt: skip
    pytest.param(
        {"weight_decay": 2.0, "momentum": 0.9, "nesterov": True, "decay_to": "init"},
        id="nesterov-init",
    ),  # fmt: skip
    pytest.param(
        {"weight_decay": lambda step: 1.0 / step, "momentum": 0.9, "maximize": True},
        id="schedule-maximize",
    ),  # fmt: skip
]


def relative(ours, expected) -> float:
    a = torch.cat([t.detach().double().flatten() for t in ours])
    b = torch.cat([t.double().flatten() for t in expected])
    return ((a - b).abs().max() / b.abs().max()).item()


def check_decay_matters(options, formula, params64):
    """The rows must test the mask: without decay, or with AdamW's full decay, the formula's
    result differs by far more than the tolerance."""
    plain = formula({**options, "weight_decay": 0.0, "lambda_norm": 0.0} if "lambda_norm"
                    in options else {**options, "weight_decay": 0.0})[0]  # fmt: skip
    assert relative(params64, plain) > 1e-6


@pytest.mark.parametrize("options", ADAMW_ROWS)
def test_adamw_cautious_matches_the_float64_formula(options):
    expected, m, v = formula_adamw_cwd(options)
    check_decay_matters(options, formula_adamw_cwd, expected)
    optimizer, params = run_library(decoupled.AdamW, options, torch.float64, fused=False)
    assert relative(params, expected) < 1e-12
    assert relative([optimizer.state[p]["exp_avg"] for p in params], m) < 1e-12
    assert relative([optimizer.state[p]["exp_avg_sq"] for p in params], v) < 1e-12
    if decoupled.optim.kernel_available():  # the C++ kernel, in float32
        optimizer, params = run_library(decoupled.AdamW, options, torch.float32, fused=None)
        assert relative(params, expected) < 1e-5


@pytest.mark.parametrize("options", SGDW_ROWS)
def test_sgdw_cautious_matches_the_float64_formula(options):
    expected, buffers = formula_sgdw_cwd(options)
    check_decay_matters(options, formula_sgdw_cwd, expected)
    optimizer, params = run_library(decoupled.SGDW, options, torch.float64, fused=False)
    assert relative(params, expected) < 1e-12
    if options.get("momentum"):
        assert relative([optimizer.state[p]["momentum_buffer"] for p in params], buffers) < 1e-12
    if decoupled.optim.kernel_available():
        optimizer, params = run_library(decoupled.SGDW, options, torch.float32, fused=None)
        assert relative(params, expected) < 1e-5


def test_the_mask_is_mixed_in_these_runs():
    """Neither all-True nor all-False: CWD differs from AdamW and from no decay."""
    options = {"weight_decay": 0.5}
    cautious = formula_adamw_cwd(options)[0]
    _, adamw_params = run_plain(decoupled.AdamW, options, torch.float64, fused=False)
    assert relative(adamw_params, cautious) > 1e-6
    _, undecayed = run_plain(decoupled.AdamW, {"weight_decay": 0.0}, torch.float64, fused=False)
    assert relative(undecayed, cautious) > 1e-6


def run_plain(cls, options, dtype, fused, grads_of=None):
    params = [p.requires_grad_() for p in start_params(dtype)]
    optimizer = cls(params, lr=PEAK_LR, fused=fused, **options)
    stream = gradient_stream(SHAPES, dtype)
    for t in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t)
        grads = next(stream) if grads_of is None else grads_of(params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return optimizer, params


def agreeing(params):
    """Gradients of the sign of θ (random sizes): m and b keep that sign, so u agrees with θ
    everywhere while θ keeps its sign (|θ| ≥ 5 at the start, far beyond 20 small steps)."""
    generator = torch.Generator().manual_seed(len(params))
    return [p.detach().sign() * (0.5 + torch.rand(p.shape, generator=generator)).to(p.dtype)
            for p in params]  # fmt: skip


def disagreeing(params):
    return [-g for g in agreeing(params)]


FAMILIES = [
    pytest.param(decoupled.AdamW, {"weight_decay": 0.5, "amsgrad": True}, id="AdamW"),
    pytest.param(decoupled.SGDW, {"weight_decay": 0.5, "momentum": 0.9, "lr": 1e-3}, id="SGDW"),
]
PATHS = [pytest.param(False, id="reference"), pytest.param(None, id="kernel")]


def large_params(dtype):
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(s, generator=generator, dtype=torch.float64) + 5.0).to(dtype)
            * torch.where(torch.rand(s, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
            for s in SHAPES]  # fmt: skip


def run_signed(cls, options, fused, grads_of, cautious):
    params = [p.requires_grad_() for p in large_params(torch.float32)]
    lr = options.get("lr", 1e-2)
    kwargs = {k: v for k, v in options.items() if k != "lr"}
    optimizer = cls(params, lr=lr, fused=fused, cautious=cautious, **kwargs)
    for _ in range(20):
        for p, g in zip(params, grads_of(params)):
            p.grad = g
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls,options", FAMILIES)
def test_all_signs_agreeing_equals_plain_decoupled_decay_bit_for_bit(cls, options, fused):
    cautious, params_c = run_signed(cls, options, fused, agreeing, cautious=True)
    plain, params_p = run_signed(cls, options, fused, agreeing, cautious=False)
    assert all(torch.equal(a, b) for a, b in zip(params_c, params_p))
    for p, q in zip(params_c, params_p):
        for key, value in plain.state[q].items():
            assert torch.equal(cautious.state[p][key], value), key
    undecayed = run_signed(cls, {**options, "weight_decay": 0.0}, fused, agreeing, False)[1]
    assert not torch.equal(params_c[0], undecayed[0])  # the decay did act


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("cls,options", FAMILIES)
def test_all_signs_disagreeing_applies_no_decay(cls, options, fused):
    cautious, params_c = run_signed(cls, options, fused, disagreeing, cautious=True)
    undecayed, params_u = run_signed(
        cls, {**options, "weight_decay": 0.0}, fused, disagreeing, cautious=False
    )
    assert all(torch.equal(a, b) for a, b in zip(params_c, params_u))
    plain = run_signed(cls, options, fused, disagreeing, cautious=False)[1]
    assert not torch.equal(params_c[0], plain[0])  # AdamW/SGDW would have decayed


@pytest.mark.parametrize("fused", PATHS)
def test_zero_direction_counts_as_agreeing(fused):
    """u = 0 (a zero gradient from the start): every coordinate decays, as AdamW's."""
    results = []
    for cautious in (True, False):
        param = torch.nn.Parameter(torch.linspace(-2, 2, 9))
        optimizer = decoupled.SGDW([param], lr=0.1, weight_decay=0.5, fused=fused,
                                   cautious=cautious)  # fmt: skip
        param.grad = torch.zeros(9)
        optimizer.step()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], torch.linspace(-2, 2, 9))


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.SGD])
def test_cautious_is_refused_on_l2(cls):
    name, fix = ("Adam", "AdamW") if cls is decoupled.Adam else ("SGD", "SGDW")
    message = (
        f"Invalid cautious value: True ({name} adds weight decay to the gradient; cautious "
        f"masking needs decoupled decay: use {fix})"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls([torch.nn.Parameter(torch.ones(2))], cautious=True)
    optimizer = cls([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid cautious value: True"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                                   "cautious": True})  # fmt: skip
    assert "cautious" not in optimizer.param_groups[0]  # torch's keys only


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_cautious_must_be_a_bool(cls):
    with pytest.raises(ValueError, match="Invalid cautious value: 'yes' \\(must be True or"):
        cls([torch.nn.Parameter(torch.ones(2))], cautious="yes")


def test_torch_fused_kernels_never_take_a_cautious_group(monkeypatch):
    params = [torch.nn.Parameter(torch.ones(3))]
    assert _kernels.can_fuse(params, 0.1, 0.01, True, [None], explicit=True)
    assert not _kernels.can_fuse(params, 0.1, 0.01, True, [None], explicit=True, cautious=True)
    monkeypatch.setattr(decoupled.optim._build, "_ops", None)  # as without the C++ kernel
    chosen = _kernels.choose_adam_update(
        True, "reference", params, [torch.ones(3)], lr=0.1, decay_rate=0.01, decoupled=True,
        references=[None], compact=False, cautious=True,
    )  # fmt: skip
    assert chosen == "reference"


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_state_dict_round_trip_and_old_checkpoints(cls):
    options = {"weight_decay": 0.5, "lr": 0.01}
    grads = lambda params: [torch.full_like(p, 0.3) for p in params]  # noqa: E731
    whole, params_w = run_signed(cls, options, False, grads, cautious=True)

    params = [p.requires_grad_() for p in large_params(torch.float32)]
    first = cls(params, lr=0.01, weight_decay=0.5, fused=False, cautious=True)
    for _ in range(10):
        for p, g in zip(params, grads(params)):
            p.grad = g
        first.step()
    saved = first.state_dict()
    assert saved["param_groups"][0]["cautious"] is True
    second = cls(params, lr=0.01, weight_decay=0.5, fused=False)  # cautious from the dict
    second.load_state_dict(saved)
    assert second.param_groups[0]["cautious"] is True
    for _ in range(10):
        for p, g in zip(params, grads(params)):
            p.grad = g
        second.step()
    assert all(torch.equal(a, b) for a, b in zip(params, params_w))

    old = cls(params, lr=0.01).state_dict()
    for group in old["param_groups"]:
        del group["cautious"]
    loaded = cls(params, lr=0.01, cautious=True)
    loaded.load_state_dict(old)
    assert loaded.param_groups[0]["cautious"] is False
