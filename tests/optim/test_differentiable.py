"""``differentiable=True`` and tensor hyperparameters, as torch.optim has them.

A differentiable step is checked the way torch checks its own (``TestDifferentiableOptimizer``
in torch's ``test/optim/test_optim.py``): ``torch.autograd.gradcheck`` in float64 through one
step, from θ, the gradient, the state and the hyperparameter tensors to θ and the new state;
and the gradients themselves against torch's differentiable step.
"""

from __future__ import annotations

import pytest
import torch

import decoupled

ADAM_ROWS = [
    pytest.param(cls, amsgrad, id=f"{cls.__name__}-{'amsgrad' if amsgrad else 'plain'}")
    for cls in (decoupled.Adam, decoupled.AdamW)
    for amsgrad in (False, True)
]


def one_step(cls, param, grad, state, **kwargs):
    """θ and the state tensors after one step from the given ones (all cloned: the step is
    in place), as a function autograd can differentiate."""
    param = param.clone()
    param.grad = grad
    optimizer = cls([param], differentiable=True, **kwargs)
    optimizer.state[param].update({k: v.clone() for k, v in state.items()})
    optimizer.step()
    new_state = optimizer.state[param]
    return (param,) + tuple(new_state[k] for k in sorted(state) if new_state[k].requires_grad)


def adam_inputs(amsgrad: bool):
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        value = torch.rand(*shape, generator=generator, dtype=torch.float64) * scale
        return value.requires_grad_()

    param, grad = tensor(6), tensor(6)
    state = {
        "step": torch.tensor(4.0, dtype=torch.float32),
        "exp_avg": tensor(6),
        "exp_avg_sq": tensor(6, scale=0.5),
    }
    if amsgrad:
        state["max_exp_avg_sq"] = tensor(6, scale=0.5)
    hyper = {
        "lr": torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
        "betas": (
            torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.99, dtype=torch.float64, requires_grad=True),
        ),
        "weight_decay": 0.1,
        "amsgrad": amsgrad,
    }
    return param, grad, state, hyper


@pytest.mark.parametrize("cls,amsgrad", ADAM_ROWS)
def test_adam_step_passes_gradcheck(cls, amsgrad):
    param, grad, state, hyper = adam_inputs(amsgrad)
    differentiable_state = {k: v for k, v in state.items() if v.requires_grad}
    step = state["step"]

    def function(param, grad, lr, beta1, beta2, *moments):
        given = dict(zip(sorted(differentiable_state), moments)) | {"step": step}
        kwargs = hyper | {"lr": lr, "betas": (beta1, beta2)}
        return one_step(cls, param, grad, given, **kwargs)

    inputs = (param, grad, hyper["lr"], *hyper["betas"])
    moments = tuple(differentiable_state[k] for k in sorted(differentiable_state))
    assert torch.autograd.gradcheck(function, inputs + moments)


def test_sgd_step_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    param, grad, buffer = (
        torch.rand(6, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3)
    )
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    weight_decay = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def function(param, grad, buffer, lr, weight_decay):
        kwargs = {"lr": lr, "momentum": 0.9, "weight_decay": weight_decay, "nesterov": True}
        return one_step(decoupled.SGD, param, grad, {"momentum_buffer": buffer}, **kwargs)

    assert torch.autograd.gradcheck(function, (param, grad, buffer, lr, weight_decay))


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW], ids=lambda c: c.__name__)
def test_gradients_through_steps_equal_torchs(cls):
    """Three differentiable steps from the same start; the gradients of θ and the moments
    with respect to θ₀ and the hyperparameter tensors equal torch's (same operations). Without
    amsgrad: torch's amsgrad step saves v for its backward pass and the next step changes v in
    place, so no backward pass crosses two of them (test_torch_optim_db checks that ours
    refuses it alike)."""
    amsgrad = False
    results = []
    for implementation in (cls, getattr(torch.optim, cls.__name__)):
        param, grad, state, hyper = adam_inputs(amsgrad=False)
        lr, (beta1, beta2) = hyper["lr"], hyper["betas"]
        weights = param.clone()
        optimizer = implementation(
            [weights], lr=lr, betas=(beta1, beta2), amsgrad=amsgrad, differentiable=True
        )
        for step in range(3):
            weights.grad = grad * (step + 1)
            optimizer.step()
        moments = optimizer.state[weights]
        loss = (weights**2).sum() + moments["exp_avg"].sum() + moments["exp_avg_sq"].sum()
        results.append(torch.autograd.grad(loss, (param, lr, beta1, beta2)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW], ids=lambda c: c.__name__)
def test_tensor_betas_stay_tensors_and_in_place_changes_take_effect(cls):
    """torch keeps tensor betas (param_groups and state_dict hold the tensors, and the step
    reads them); changing them in place changes the next step, exactly as in torch."""
    runs = []
    for implementation in (cls, getattr(torch.optim, cls.__name__)):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        betas = (torch.tensor(0.9), torch.tensor(0.99))
        optimizer = implementation([param], lr=0.1, betas=betas, foreach=False)
        assert optimizer.param_groups[0]["betas"][0] is betas[0]
        assert optimizer.state_dict()["param_groups"][0]["betas"][1] is betas[1]
        for step in range(4):
            if step == 2:
                betas[0].fill_(0.5)  # a schedule of β1, as torch's in-place tensor update
            param.grad = torch.sin(param.detach() * (step + 1))
            optimizer.step()
        runs.append((param.detach().clone(), dict(optimizer.state[param])))
    (ours, our_state), (theirs, their_state) = runs
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for key in their_state:
        torch.testing.assert_close(our_state[key], their_state[key], rtol=0, atol=0)


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_tensor_betas_on_the_fast_paths_match_torch(fused):
    """The fast paths read tensor betas as numbers at each step (to float rounding)."""
    runs = []
    for implementation in (decoupled.AdamW, torch.optim.AdamW):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        betas = (torch.tensor(0.8), torch.tensor(0.95))
        optimizer = implementation([param], lr=0.01, betas=betas, fused=fused)
        for step in range(5):
            if step == 3:
                betas[1].fill_(0.9)
            param.grad = torch.cos(param.detach() * (step + 1))
            optimizer.step()
        runs.append(param.detach().clone())
    torch.testing.assert_close(runs[0], runs[1])
