"""The fused fast path (torch's fused kernels) against our reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoupled
from tests.helpers import OptimizerInput, train, twin_models  # noqa: F401

FUSED_INPUTS = [
    OptimizerInput({"weight_decay": 0.1}, "decay"),
    OptimizerInput({"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
    OptimizerInput({"weight_decay": 0.05, "maximize": True}, "maximize"),
    OptimizerInput({"lr": torch.tensor(0.01), "weight_decay": 0.0}, "tensor lr"),
    OptimizerInput({"weight_decay": lambda step: 0.1 / step**0.5}, "decay schedule"),
]
DECOUPLED_ONLY = [
    OptimizerInput({"weight_decay": 0.5, "decay_scale": "schedule"}, "schedule"),
    OptimizerInput({"weight_decay": 1e-4, "decay_scale": "constant"}, "constant"),
    OptimizerInput({"weight_decay": 0.5, "decay_scale": "corrected"}, "corrected"),
]
CASES = [(cls, inp) for cls in (decoupled.Adam, decoupled.AdamW) for inp in FUSED_INPUTS] + [
    (decoupled.AdamW, inp) for inp in DECOUPLED_ONLY
]
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (1,)]


class Params(torch.nn.Module):
    """Parameters of several shapes; the gradients come from a fixed random stream, not from
    the parameters, so the comparison measures the kernels' rounding and not its
    amplification by a chaotic training trajectory."""

    def __init__(self, dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.tensors = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in SHAPES
        )


def run_both(cls, kwargs, dtype, steps=100, scheduler=None):
    model_fused, model_reference = Params(dtype), Params(dtype)
    kwargs = {"lr": 1e-2, **kwargs}
    fused = cls(model_fused.parameters(), fused=True, **copy.copy(kwargs))
    reference = cls(model_reference.parameters(), **kwargs)
    schedulers = [scheduler(o) for o in (fused, reference)] if scheduler else []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p_f, p_r in zip(model_fused.parameters(), model_reference.parameters()):
            grad = torch.randn(p_f.shape, generator=generator, dtype=dtype)
            p_f.grad, p_r.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
        for s in schedulers:
            s.step()
    return fused, reference, model_fused, model_reference


def assert_close_paths(fused, reference, model_fused, model_reference, dtype):
    """Relative error of the whole parameter vector, and of each state vector (‖Δ‖∞/‖x‖∞):
    a single entry crossing zero has no meaningful relative error of its own."""

    def flat(tensors):
        return torch.cat([t.detach().reshape(-1).double() for t in tensors])

    params_f, params_r = list(model_fused.parameters()), list(model_reference.parameters())
    assert max_relative_error(flat(params_f), flat(params_r)) <= TOLERANCE[dtype]
    for key in reference.state[params_r[0]]:
        state_f = flat(fused.state[p][key] for p in params_f)
        state_r = flat(reference.state[p][key] for p in params_r)
        assert max_relative_error(state_f, state_r) <= TOLERANCE[dtype], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls,inp", CASES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_fused_path_matches_the_reference_loop(cls, inp, dtype):
    scheduler = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 100)  # noqa: E731
    assert_close_paths(*run_both(cls, inp.kwargs, dtype, scheduler=scheduler), dtype)


@settings(max_examples=20, deadline=None)
@given(
    lr=st.floats(1e-4, 0.05),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.9, 0.9999),
    weight_decay=st.floats(0.0, 1.0),
    amsgrad=st.booleans(),
    decoupled_decay=st.booleans(),
    decay_scale=st.sampled_from(decoupled.DECAY_SCALES),
)
def test_property_fused_matches_reference(
    lr, beta1, beta2, weight_decay, amsgrad, decoupled_decay, decay_scale
):
    cls = decoupled.AdamW if decoupled_decay else decoupled.Adam
    kwargs = dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, amsgrad=amsgrad)
    if decoupled_decay:
        kwargs["decay_scale"] = decay_scale
    assert_close_paths(*run_both(cls, kwargs, torch.float32, steps=30), torch.float32)


def test_decay_to_init_falls_back_to_the_reference_loop():
    fused, reference, m_f, m_r = run_both(decoupled.AdamW, {"decay_to": "init"}, torch.float64)
    for p_f, p_r in zip(m_f.parameters(), m_r.parameters()):
        assert torch.equal(p_f, p_r)  # same code path: bit-identical


def test_state_dict_round_trips_between_paths():
    model, model_copy, shape = twin_models("mlp", torch.float32)
    fused = decoupled.AdamW(model.parameters(), lr=1e-2, fused=True)
    train(model, fused, shape, 20, torch.float32)
    reference = decoupled.AdamW(model_copy.parameters(), lr=1e-2)
    model_copy.load_state_dict(model.state_dict())
    saved = fused.state_dict()
    reference.load_state_dict(copy.deepcopy(saved))
    assert reference.param_groups[0]["fused"] is True  # the choice travels with the state
    torch_optimizer = torch.optim.AdamW(model_copy.parameters(), lr=1e-2)
    torch_optimizer.load_state_dict(copy.deepcopy(saved))  # and torch reads our state
    assert torch_optimizer.state_dict()["state"].keys() == saved["state"].keys()
