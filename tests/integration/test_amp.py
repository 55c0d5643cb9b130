"""Mixed precision: ``torch.amp.GradScaler`` drives our optimizers like torch.optim's, and what
the state's dtype is for float32 (master) weights under autocast and for bfloat16 weights.

GradScaler needs nothing from an optimizer but ``param_groups`` and ``step()``: it unscales the
gradients in place, and calls ``step()`` only when they are all finite. So an overflow step
leaves the parameters, the moments and every step counter untouched, and otherwise the run is
the same as torch.optim.AdamW's under the same scaler (bit for bit: same single-tensor ops).
"""

from __future__ import annotations

import math

import pytest
import torch

import decoupled

STEPS, OVERFLOW_STEP = 6, 2
PAIRS = [
    pytest.param(decoupled.AdamW, torch.optim.AdamW, id="AdamW"),
    pytest.param(decoupled.Adam, torch.optim.Adam, id="Adam"),
    pytest.param(decoupled.SGDW, None, id="SGDW"),
]


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    ).to(dtype)


def _batch(step: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=generator, dtype=dtype), torch.randn(
        8, 2, generator=generator, dtype=dtype
    )


def _snapshot(model, optimizer) -> dict:
    """Every tensor and counter a step could change."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": {
            (i, key): value.clone()
            for i, p in enumerate(model.parameters())
            for key, value in optimizer.state[p].items()
        },
        "groups": [
            {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ],
    }


def _assert_same(before: dict, after: dict) -> None:
    for x, y in zip(before["params"], after["params"]):
        assert torch.equal(x, y)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert before["groups"] == after["groups"]


def _train_with_scaler(optimizer_class, **kwargs):
    """float32 weights, bfloat16 autocast, a GradScaler, and an inf gradient at one step."""
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    overflow = {}
    for step in range(STEPS):
        optimizer.zero_grad()
        inputs, targets = _batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
        scaler.scale(loss).backward()
        if step == OVERFLOW_STEP:
            next(iter(model.parameters())).grad[0, 0] = math.inf  # as an fp16 overflow would
            before, scale_before = _snapshot(model, optimizer), scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if step == OVERFLOW_STEP:
            overflow = {"before": before, "after": _snapshot(model, optimizer)}
            overflow["scale"] = (scale_before, scaler.get_scale())
    return model, optimizer, overflow


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_grad_scaler_skips_overflow_steps_and_matches_torch(ours, theirs):
    model, optimizer, overflow = _train_with_scaler(ours, fused=False)  # the reference loop
    # The overflow step changed nothing, and the scaler backed off.
    _assert_same(overflow["before"], overflow["after"])
    scale_before, scale_after = overflow["scale"]
    assert scale_after == scale_before / 2
    if theirs is None:
        return
    # Under the same scaler (same unscaling, same skipped step), torch.optim ends identical.
    torch_model, torch_optimizer, _ = _train_with_scaler(theirs, foreach=False)
    for p, q in zip(model.parameters(), torch_model.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p]["step"] == STEPS - 1  # one step skipped
        assert torch.equal(optimizer.state[p]["exp_avg"], torch_optimizer.state[q]["exp_avg"])
        # float32 weights under autocast: gradients, and so the moments, are float32.
        assert optimizer.state[p]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("ours", [decoupled.AdamW, decoupled.SGDW], ids=lambda c: c.__name__)
def test_grad_scaler_skips_overflow_steps_on_the_fast_path(ours):
    _, _, overflow = _train_with_scaler(ours)  # fused=None: the one-pass kernel
    _assert_same(overflow["before"], overflow["after"])


@pytest.mark.parametrize("ours,theirs", PAIRS[:2])
def test_bfloat16_weights_keep_bfloat16_state_like_torch(ours, theirs):
    """With ``compensate=False``, no hidden master weight: state follows the parameter's dtype,
    exactly as in torch.optim (the default keeps an 8-bit remainder instead,
    tests/optim/test_compensated.py)."""
    results = []
    for optimizer_class, kwargs in ((ours, {"compensate": False}), (theirs, {"foreach": False})):
        model = _model(torch.bfloat16)
        optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
        for step in range(STEPS):
            optimizer.zero_grad()
            inputs, targets = _batch(step, torch.bfloat16)
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
        results.append((model, optimizer))
    (model, optimizer), (torch_model, _) = results
    for p, q in zip(model.parameters(), torch_model.parameters()):
        assert p.dtype == torch.bfloat16 and optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(p, q)
