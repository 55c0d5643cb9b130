"""A damaged checkpoint is refused by ``load_state_dict`` before anything changes, on every path."""

from __future__ import annotations

import copy

import pytest
import torch

import decoupled
from tests.optim.optim_db import cases

ADAMS = (decoupled.Adam, decoupled.AdamW)


def damage_step(value):
    def damage(state):
        state["step"] = value

    return damage


def set_key(key, make):
    def damage(state):
        state[key] = make(state[key]) if key in state else make(None)

    return damage


def poke(key, value, index=1):
    """One element of a state tensor set to ``value``."""

    def damage(state):
        state[key] = state[key].clone()
        state[key].view(-1)[index] = value

    return damage


def drop(key):
    def damage(state):
        del state[key]

    return damage


WHERE = r"Invalid state for parameter 2 \(group 1\): "
ADAM_DAMAGES = [
    ("step", damage_step(torch.tensor(-1.0)), r"step = -1.0 \(must be finite and >= 0"),
    ("step", damage_step(torch.tensor(float("nan"))), r"step = nan \(must be finite"),
    ("step", damage_step(torch.tensor(float("inf"))), r"step = inf \(must be finite"),
    ("step", damage_step(torch.tensor(2.5)), r"step = 2.5 \(.*whole number"),
    ("step", damage_step(-3), r"step = -3.0 \("),
    ("step", damage_step(torch.ones(2)), r"step = tensor of shape \(2,\) \(must be one number"),
    ("step", damage_step("7"), r"step = '7' \(must be a number"),
    ("exp_avg", set_key("exp_avg", lambda t: t[:2]), r"exp_avg shape = \(2,\) \(must be .*\(4,\)"),
    ("exp_avg", poke("exp_avg", float("nan")), r"exp_avg = nan \(an element\) \(must be finite"),
    ("exp_avg", drop("exp_avg"), r"exp_avg = missing"),
    ("exp_avg_sq", poke("exp_avg_sq", -1.0), r"exp_avg_sq = -1.0 .*must be finite and >= 0"),
    ("exp_avg_sq", poke("exp_avg_sq", float("inf")), r"exp_avg_sq = inf .*must be finite"),
    ("exp_avg_sq", poke("exp_avg_sq", float("nan")), r"exp_avg_sq = nan .*must be finite"),
    ("exp_avg_sq", set_key("exp_avg_sq", lambda t: t.long()), r"exp_avg_sq dtype = torch.int64"),
    ("exp_avg_sq", set_key("exp_avg_sq", lambda t: [0.0] * 4), r"exp_avg_sq = list \(must be a"),
    ("max_exp_avg_sq", poke("max_exp_avg_sq", -2.0), r"max_exp_avg_sq = -2.0 .*>= 0"),
    ("max_exp_avg_sq", drop("max_exp_avg_sq"), r"max_exp_avg_sq = missing"),
]
BUFFER = "momentum_buffer"
SGD_DAMAGES = [
    (BUFFER, set_key(BUFFER, lambda t: t.view(2, 2)), rf"{BUFFER} shape = \(2, 2\)"),
    (BUFFER, poke(BUFFER, float("nan")), rf"{BUFFER} = nan"),
    (BUFFER, set_key(BUFFER, lambda t: t.int()), rf"{BUFFER} dtype = torch.int32"),
    (BUFFER, set_key(BUFFER, lambda t: 0.5), rf"{BUFFER} = float"),
]
SHARED_DAMAGES = [
    ("init_param", set_key("init_param", lambda t: torch.zeros(5)), r"init_param shape = \(5,\)"),
]

DAMAGES = {"adam": ADAM_DAMAGES + SHARED_DAMAGES, "sgd": SGD_DAMAGES + SHARED_DAMAGES}
CASES = [
    pytest.param(*case.values, field, damage, regex, id=f"{case.id}-{field}-{n}")
    for case in cases()
    for n, (field, damage, regex) in enumerate(DAMAGES[case.values[0].family])
]


def trained(cls, path, monkeypatch):
    """An optimizer over two groups (three parameters) after two steps on ``path``."""
    kwargs = path.kwargs
    if path.hide_kernel:
        monkeypatch.setattr(decoupled.optim._build, "_ops", None)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(3,), (2, 2), (4,)]]
    extra = {"amsgrad": True} if cls in ADAMS else {"momentum": 0.9}
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1}]
    optimizer = cls(groups, lr=0.01, decay_to="init", **extra, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return optimizer, params


def assert_same(a, b):
    """Equal nested state dicts: tensors bit for bit (NaN equal to NaN), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("info,path,field,damage,regex", CASES)
def test_a_damaged_state_is_refused_and_nothing_changes(
    info, path, field, damage, regex, monkeypatch
):
    optimizer, params = trained(info.cls, path, monkeypatch)
    damaged = copy.deepcopy(optimizer.state_dict())
    damage(damaged["state"][2])
    damaged["param_groups"][0]["lr"] = 0.5  # a change that must not be loaded either
    before = copy.deepcopy(optimizer.state_dict())
    values = [p.detach().clone() for p in params]

    with pytest.raises(ValueError, match=WHERE + regex):
        optimizer.load_state_dict(damaged)

    assert_same(optimizer.state_dict(), before)
    for p, value in zip(params, values):
        assert torch.equal(p, value)
    for p in params:  # and it still steps, to finite values
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("fused", [None, False])
def test_the_reported_negative_step_raises_instead_of_writing_nan(fused):
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = decoupled.AdamW([p], lr=0.01, fused=fused)
    p.grad = torch.ones(3)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["step"] = torch.tensor(-1.0)
    message = r"^Invalid state for parameter 0 \(group 0\): step = -1.0 \(must be finite and >= 0"
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved)
    p.grad = torch.ones(3)
    optimizer.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("fused", [None, False, "torch"])
def test_a_negative_step_written_into_live_state_raises_on_every_path(fused):
    """``state_dict()`` shares its per-parameter dicts with the optimizer (as torch's does), so
    editing it damages the live state without ``load_state_dict``: the step must then fail as
    torch's loop does (1 − β1⁰ = 0), not write NaN (the C++ kernel refuses such a count)."""
    p = torch.nn.Parameter(torch.ones(3))
    if fused == "torch":
        optimizer = torch.optim.AdamW([p], lr=0.01, foreach=False)
    else:
        optimizer = decoupled.AdamW([p], lr=0.01, fused=fused)
    p.grad = torch.ones(3)
    optimizer.step()
    optimizer.state_dict()["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ZeroDivisionError):
        optimizer.step()
    assert torch.isfinite(p).all()


def float_state(optimizer):
    """Each parameter's state tensors as float32 (``step`` as a number), in parameter order."""
    return [
        {key: value.float() if torch.is_tensor(value) else value for key, value in state.items()}
        for state in optimizer.state_dict()["state"].values()
    ]


def assert_states_close(ours, theirs, rtol):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=0, msg=key)


def step_alike(*pairs):
    """One step of each optimizer on its parameters, with the same gradients."""
    grads = [torch.randn_like(p) for p in pairs[0][1]]
    for optimizer, params in pairs:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("info,path", cases(entries=lambda info: info.torch_cls))
def test_a_valid_torch_state_dict_still_loads_both_ways(info, path, monkeypatch):
    """torch's state loads into ours and ours into torch's, values kept (to the state dtype's
    rounding): the optimizers then step alike."""
    ours_cls, torch_cls, path_kwargs = info.cls, info.torch_cls, path.kwargs
    kwargs = {"amsgrad": True} if info.family == "adam" else {"momentum": 0.9}
    if path.hide_kernel:
        monkeypatch.setattr(decoupled.optim._build, "_ops", None)
    compact = "state_dtype" in path_kwargs
    rtol = 2.0**-8 if compact else 0.0  # bfloat16 state: rounded to 8 significant bits
    step_tol = dict(rtol=0, atol=1e-4) if compact else dict(rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    shapes = [(4, 3), (3,)]
    theirs_params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = torch_cls(theirs_params, lr=0.01, **kwargs)
    for _ in range(3):
        step_alike((theirs, theirs_params))
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours = ours_cls(ours_params, lr=0.01, **kwargs, **path_kwargs)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert_states_close(float_state(ours), float_state(theirs), rtol)
    step_alike((ours, ours_params), (theirs, theirs_params))
    for a, b in zip(ours_params, theirs_params):
        torch.testing.assert_close(a, b, **step_tol)

    back_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    back = torch_cls(back_params, lr=0.01, **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # live state is shared otherwise
    assert_states_close(float_state(back), float_state(ours), 0.0)  # widened exactly
    step_alike((ours, ours_params), (back, back_params))
    for a, b in zip(ours_params, back_params):
        torch.testing.assert_close(a, b, **step_tol)
