"""GradScaler's protocol for optimizers that unscale in their own step.

torch's fused optimizers set ``_step_supports_amp_scaling``; GradScaler then leaves the
gradients scaled, sets ``optimizer.grad_scale`` and ``optimizer.found_inf``, and the step
divides the gradients by the scale inside its kernel, or changes nothing when ``found_inf``
is set (torch's ``test_fused_does_not_step_if_foundinf`` in ``test/optim/test_optim.py``).
Ours do the same with ``fused=True`` (on the C++ kernel and on torch's fused kernels); with
``fused=None`` or ``False`` GradScaler unscales itself, as for torch's default path
(``tests/integration/test_amp.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

import decoupled
from decoupled.optim import _build
from decoupled.optim.decay import unscale_shared_
from tests.helpers import steps_with_a_shared_gradient

PATHS = ["kernel", "torch-fused"]
CASES = [
    pytest.param(cls, path, id=f"{cls.__name__}-{path}")
    for cls in (decoupled.Adam, decoupled.AdamW, decoupled.SGD, decoupled.SGDW)
    for path in PATHS
    if not (path == "torch-fused" and cls in (decoupled.SGD, decoupled.SGDW))
]


@pytest.fixture
def on_path(monkeypatch):
    def choose(path: str) -> None:
        if path == "torch-fused":  # as on a machine without the C++ kernel
            monkeypatch.setattr(_build, "_ops", None)
        elif _build.kernel_ops() is None:
            pytest.skip("the C++ kernel does not build here")

    return choose


def test_the_protocol_is_declared_with_fused_true_as_torch_declares_it():
    param = [torch.nn.Parameter(torch.ones(2))]
    for cls in (decoupled.Adam, decoupled.AdamW, decoupled.SGD, decoupled.SGDW):
        assert cls(param, fused=True)._step_supports_amp_scaling
        assert not cls(param)._step_supports_amp_scaling  # GradScaler unscales, as for torch's
        assert not cls(param, fused=False)._step_supports_amp_scaling
        assert not cls(param, differentiable=True)._step_supports_amp_scaling


@pytest.mark.parametrize("cls,path", CASES)
def test_fused_does_not_step_if_foundinf(cls, path, on_path):
    on_path(path)
    params = [torch.ones(5, requires_grad=True) for _ in range(3)]
    kept = [p.detach().clone() for p in params]
    momentum = {"momentum": 0.9} if "SGD" in cls.__name__ else {}
    optimizer = cls(params, lr=0.1, weight_decay=0.1, fused=True, **momentum)
    optimizer.grad_scale, optimizer.found_inf = torch.ones(()), torch.ones(())
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p, before in zip(params, kept):
        assert torch.equal(p.detach(), before)
        assert torch.equal(p.grad, torch.ones_like(p))
    assert all(float(s.get("step", 0)) == 0 for s in optimizer.state.values())
    assert optimizer.param_groups[0]["decay_steps"] == 0


@pytest.mark.parametrize("cls,path", CASES)
def test_the_step_unscales_the_gradients_in_its_own_pass(cls, path, on_path, path_log):
    """With ``grad_scale`` set, the step equals an unscaled step, and leaves g/scale in .grad
    (as torch's fused kernels do); the path itself unscales (no fallback to the loop)."""
    on_path(path)
    kwargs = {"lr": 0.01, "weight_decay": 0.1} | (
        {"momentum": 0.9} if "SGD" in cls.__name__ else {}
    )
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(300, generator=generator)
    grads = [torch.randn(300, generator=generator) for _ in range(3)]
    results = []
    for scale in (None, torch.tensor(1024.0)):
        param = torch.nn.Parameter(start.clone())
        optimizer = cls([param], fused=True, **kwargs)
        for grad in grads:
            param.grad = grad.clone() if scale is None else grad * scale
            if scale is not None:
                optimizer.grad_scale, optimizer.found_inf = scale, torch.zeros(())
            optimizer.step()
            torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    family = "adam" if "Adam" in cls.__name__ else "sgd"
    expected = f"kernel_{family}_update" if path == "kernel" else "fused_adam_update"
    assert set(path_log) == {expected}


def train_with_scaler(optimizer_class, **kwargs):
    """float32 weights, bfloat16 autocast, a GradScaler, and an inf gradient at step 2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(6):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(step)
        inputs, targets = (
            torch.randn(8, 6, generator=generator),
            torch.randn(8, 2, generator=generator),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer


@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_run_matches_torchs_fused_adamw(path, on_path):
    """The whole GradScaler run (an overflow step skipped) against torch.optim.AdamW with
    ``fused=True``: bit for bit on torch's fused kernel, to float rounding on the C++ kernel
    (``_kernels.py`` says where it rounds otherwise)."""
    on_path(path)
    ours, our_optimizer = train_with_scaler(decoupled.AdamW, fused=True)
    theirs, their_optimizer = train_with_scaler(torch.optim.AdamW, fused=True)
    assert our_optimizer._step_supports_amp_scaling  # GradScaler left the unscaling to us
    tolerance = {"rtol": 0, "atol": 0} if path == "torch-fused" else {}
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **tolerance)
        for key, value in their_optimizer.state[q].items():
            torch.testing.assert_close(our_optimizer.state[p][key], value, **tolerance)
        assert float(our_optimizer.state[p]["step"]) == 5  # one of six steps skipped


def test_grad_scaler_run_of_sgd_matches_torchs_fused_sgd(on_path):
    on_path("kernel")
    ours, optimizer = train_with_scaler(decoupled.SGD, momentum=0.9, fused=True)
    assert optimizer._step_supports_amp_scaling
    theirs, _ = train_with_scaler(torch.optim.SGD, momentum=0.9, fused=True)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    "cls,path",
    [(decoupled.AdamW, "kernel"), (decoupled.SGDW, "kernel"), (decoupled.AdamW, "torch-fused")],
    ids=["AdamW-kernel", "SGDW-kernel", "AdamW-torch-fused"],
)
def test_a_gradient_shared_by_two_parameters_is_unscaled_as_in_the_reference_loop(
    cls, path, on_path, path_log
):
    """One ``.grad`` tensor given to two parameters: the C++ kernel would divide it by the
    loss scale once per chunk, in two threads at once, and torch's fused kernel once for the
    first parameter before the second reads it; the list is unscaled first instead, once per
    entry as the reference loop does, so every path leaves the same θ, state and .grad
    (two steps; the moments show the gradient's size, which Adam's θ hardly does)."""
    on_path(path)
    # 70,000 elements: several chunks
    results = [steps_with_a_shared_gradient(cls, 70_000, fused=fused) for fused in (True, False)]
    family = "adam" if cls is decoupled.AdamW else "sgd"
    fast = f"kernel_{family}_update" if path == "kernel" else "fused_adam_update"
    assert path_log == [fast] * 2 + [f"{family}_update"] * 2
    assert len(results[0]) == len(results[1])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert torch.equal(results[0][0], torch.full((70_000,), 1.0))  # 4096 / 64 / 64


def test_only_overlapping_gradients_are_unscaled_before_the_step():
    """``unscale_shared_``: disjoint views of one flat buffer (DDP's bucket views) and empty
    gradients keep the scale for the kernel's own pass; overlapping ones are divided here,
    by 1 where a device flag says the step is skipped (the gradients then stay scaled)."""
    flat, scale = torch.full((10,), 8.0), torch.tensor(2.0)
    assert unscale_shared_([flat[:5], flat[5:], torch.empty(0), torch.empty(0)], scale) is scale
    assert torch.equal(flat, torch.full((10,), 8.0))
    assert unscale_shared_([flat[:6], flat[4:]], scale) is None
    assert flat.tolist() == [4.0] * 4 + [2.0] * 2 + [4.0] * 4  # the overlap divided twice
    grad = torch.full((3,), 8.0)
    assert unscale_shared_([grad, grad], scale, found_inf=torch.ones(())) is None
    assert torch.equal(grad, torch.full((3,), 8.0))
    assert unscale_shared_([grad, grad], None) is None
