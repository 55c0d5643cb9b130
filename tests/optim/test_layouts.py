"""Parameters, gradients and state in different memory layouts: a channels_last weight with a
contiguous gradient, moments loaded from a checkpoint of a contiguous model. Every path must
update the right elements (torch's fused kernels walk memory without checking strides), and
state laid out unlike its parameter is re-laid once so that the fast paths keep taking it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import decoupled
from decoupled.optim import _build

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
CHANNELS_LAST = torch.channels_last


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def conv(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(4, 6, 3).to(dtype)


def batch(dtype, generator):
    return torch.randn(2, 4, 7, 7, generator=generator, dtype=dtype)


@pytest.mark.parametrize("gradient", ["manual", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32-no-kernel"])
@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW], ids=lambda c: c.__name__)
def test_torch_fused_path_with_a_contiguous_gradient_of_a_channels_last_weight(
    cls, dtype, gradient, path_log, monkeypatch
):
    """The gradient is copied into the weight's layout before torch's fused kernel runs; the
    update equals the reference loop's. A contiguous gradient comes from assigning one, or
    from autograd accumulating into an existing contiguous ``.grad``."""
    if dtype == torch.float32:
        monkeypatch.setattr(_build, "_ops", None)  # as where the C++ kernel cannot be built

    def run(fused):
        weight = torch.nn.Parameter(
            conv(dtype).weight.detach().contiguous(memory_format=CHANNELS_LAST)
        )
        optimizer = cls([weight], lr=0.1, weight_decay=0.1, amsgrad=True, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            if gradient == "manual":
                weight.grad = torch.randn(weight.shape, generator=generator, dtype=dtype)
            else:
                weight.grad = torch.zeros(weight.shape, dtype=dtype)  # contiguous
                with warnings.catch_warnings():  # "do not obey the gradient layout contract"
                    warnings.simplefilter("ignore", UserWarning)
                    torch.nn.functional.conv2d(
                        batch(dtype, generator), weight
                    ).square().sum().backward()
            assert weight.grad.is_contiguous()
            optimizer.step()
        return weight, optimizer.state[weight]

    (fast, fast_state), (reference, reference_state) = run(None), run(False)
    assert path_log == ["fused_adam_update"] * 5 + ["adam_update"] * 5
    assert relative_error(fast, reference) <= TOLERANCE[dtype]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert relative_error(fast_state[key], reference_state[key]) <= TOLERANCE[dtype], key


def test_torch_fused_path_leaves_moments_laid_out_unlike_their_parameter_to_the_reference():
    """Moments set by hand in another layout are not re-laid at a step: that parameter takes
    the reference loop, the others torch's fused kernel, and all update the right elements."""

    def run(fused):
        generator = torch.Generator().manual_seed(0)
        make = lambda: torch.randn(6, 5, generator=generator, dtype=torch.float64)  # noqa: E731
        params = [torch.nn.Parameter(make().t()), torch.nn.Parameter(make())]
        optimizer = decoupled.AdamW(params, lr=0.1, fused=fused)
        for _ in range(3):
            for p in params:
                p.grad = make().reshape(p.shape).contiguous()
            optimizer.step()
            state = optimizer.state[params[0]]
            state["exp_avg"] = state["exp_avg"].contiguous()  # unlike its transposed parameter
        return params

    for fast, reference in zip(run(None), run(False)):
        assert relative_error(fast, reference) <= TOLERANCE[torch.float64]


CHECKPOINT_CASES = [
    (decoupled.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    (decoupled.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (decoupled.SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "ours,theirs,kwargs", CHECKPOINT_CASES, ids=lambda v: getattr(v, "__name__", "")
)
def test_resuming_a_contiguous_checkpoint_in_a_channels_last_model(
    ours, theirs, kwargs, dtype, path_log
):
    """The loaded state is copied into the parameters' layout once (same values), the fast
    path takes every later step (the kernel accepts it; torch's fused kernel updates the
    right elements), and training goes on as with torch.optim resumed from the same dict."""
    model = conv(dtype)
    optimizer = ours(model.parameters(), **kwargs)
    generator = torch.Generator().manual_seed(1)
    model(batch(dtype, generator)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())

    models = [copy.deepcopy(model).to(memory_format=CHANNELS_LAST) for _ in range(2)]
    resumed = [cls(m.parameters(), **kwargs) for cls, m in zip((ours, theirs), models)]
    for optimizer in resumed:
        optimizer.load_state_dict(copy.deepcopy(saved))
    weight = models[0].weight
    assert weight.stride() != model.weight.stride()
    key = "momentum_buffer" if ours is decoupled.SGD else "exp_avg"
    assert resumed[0].state[weight][key].stride() == weight.stride()
    assert torch.equal(resumed[0].state[weight][key], saved["state"][0][key])
    path_log.clear()
    for _ in range(3):
        x = batch(dtype, generator).contiguous(memory_format=CHANNELS_LAST)
        for m, optimizer in zip(models, resumed):
            optimizer.zero_grad()
            m(x).square().sum().backward()
            optimizer.step()
    family = "sgd" if ours is decoupled.SGD else "adam"
    if dtype == torch.float32:
        expected = f"kernel_{family}_update"
    else:  # torch's fused kernel for Adam; SGD has none
        expected = "sgd_update" if family == "sgd" else "fused_adam_update"
    assert path_log == [expected] * 3
    for p, q in zip(*(m.parameters() for m in models)):
        assert relative_error(p, q) <= TOLERANCE[dtype]
        for key, value in resumed[1].state[q].items():
            if key != "step":
                assert relative_error(resumed[0].state[p][key], value) <= TOLERANCE[dtype], key
                assert resumed[0].state[p][key].stride() == p.stride(), key


def test_decay_reference_taken_before_a_conversion_to_channels_last(path_log):
    """θ₀ of ``decay_to="init"``, cloned at construction from a contiguous weight, is re-laid
    when the model has become channels_last, so that the kernel keeps taking the steps."""
    model = conv(torch.float32)
    optimizer = decoupled.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5, decay_to="init")
    initial = model.weight.detach().clone()
    model.to(memory_format=CHANNELS_LAST)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        optimizer.zero_grad()
        model(batch(torch.float32, generator)).square().sum().backward()
        optimizer.step()
    assert path_log == ["kernel_adam_update"] * 2
    reference = optimizer.state[model.weight]["init_param"]
    assert reference.stride() == model.weight.stride() and torch.equal(reference, initial)
