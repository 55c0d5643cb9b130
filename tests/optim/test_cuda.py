"""The Triton path compiled on a GPU: the default for CUDA parameters, equal to the reference
loop (compensated bfloat16/float16 θ included), no host synchronization in ``step()``
(``torch.cuda.set_sync_debug_mode("error")``), a training step captured in a CUDA graph and
replayed equal to eager steps, and the benchmark. Skipped without CUDA (the same kernels run
under the interpreter in ``test_triton.py`` and ``test_triton_compact.py``)."""

from __future__ import annotations

import pytest
import torch

import decoupled
from tests.helpers import assert_same_training_state

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none here)"
)
triton = pytest.importorskip("triton") if torch.cuda.is_available() else None

SHAPES = [(4096,), (1000, 33), (7,), (64, 3, 3, 3)]


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=generator).to("cuda", dtype)) for s in SHAPES
    ]


def run(cls, params, steps=5, seed=1, grad_size=1.0, **options):
    optimizer = cls(params, **options)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=generator) * grad_size
            p.grad = grad.to("cuda", p.dtype)
        optimizer.step()
    return optimizer


def test_cuda_parameters_take_the_triton_path_by_default():
    from decoupled.optim._kernels import choose_adam_update, choose_sgd_update

    params = make_params()
    options = {"lr": 1e-3, "decay_rate": 0.0, "decoupled": True, "references": [None] * 4}
    update = choose_adam_update(None, None, params, params, compact=False, **options)
    assert update.__name__ == "triton_adam_update"
    assert choose_sgd_update(None, None, params, params, 1e-3).__name__ == "triton_sgd_update"


@pytest.mark.parametrize(
    "cls,options",
    [
        (decoupled.AdamW, {"amsgrad": True, "weight_decay": 0.1}),
        (decoupled.AdamW, {"state_dtype": torch.bfloat16, "decay_to": "init"}),
        (decoupled.Adam, {"weight_decay": 0.1, "maximize": True}),
        (decoupled.SGDW, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        (decoupled.SGD, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
    ],
)
def test_compiled_kernels_match_the_reference_loop(cls, options):
    reference_params, params = make_params(), make_params()
    reference = run(cls, reference_params, fused=False, lr=1e-2, **options)
    ours = run(cls, params, triton=True, lr=1e-2, **options)
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in reference.state[q].items():
            if torch.is_tensor(value):
                rtol = 2**-7 if value.dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(
                    ours.state[p][key].float().cpu(), value.float().cpu(), rtol=rtol, atol=1e-6
                )


@pytest.mark.parametrize(
    "cls,dtype,options",
    [
        (decoupled.AdamW, torch.bfloat16, {"amsgrad": True, "weight_decay": 0.1}),
        (decoupled.AdamW, torch.bfloat16, {"cautious": True, "decay_to": "init"}),
        (decoupled.AdamW, torch.float16, {"state_dtype": torch.bfloat16, "maximize": True}),
        (decoupled.SGDW, torch.bfloat16, {"momentum": 0.9, "nesterov": True}),
    ],
)
def test_compiled_kernel_steps_compensated_weights_like_the_reference_loop(
    cls, dtype, options, launches
):
    """Compensated θ (``param_remainder``) by default on CUDA: the Triton kernel launched,
    master weights θ + r·ulp/256 within one remainder unit per step of the reference loop's
    and at least 99 % of θ, r and the moments bit for bit (``test_triton_compact.py`` says
    why not all)."""
    from decoupled.optim._compensated import _unit, master

    reference_params, params = make_params(dtype), make_params(dtype)
    options = {"weight_decay": 0.5} | options
    reference = run(cls, reference_params, fused=False, lr=1e-3, **options)
    ours = run(cls, params, lr=1e-3, **options)
    assert launches["adam_kernel" if cls is decoupled.AdamW else "sgd_kernel"] == 5
    differing = total = 0
    for p, q in zip(params, reference_params):
        state_p, state_q = ours.state[p], reference.state[q]
        assert set(state_p) == set(state_q) and "param_remainder" in state_p
        ours_weight = master(p.detach(), state_p["param_remainder"]).double()
        weight = master(q.detach(), state_q["param_remainder"]).double()
        units = 5 * _unit(q.detach()).double()  # at most one a step
        assert bool(((ours_weight - weight).abs() <= units + 2**-22 * weight.abs()).all())
        pairs = [(p.detach(), q.detach())]
        pairs += [(state_p[k], state_q[k]) for k in state_q if k != "step"]
        for a, b in pairs:
            assert a.dtype == b.dtype
            same = a.view(torch.int16) == b.view(torch.int16) if a.element_size() == 2 else a == b
            differing, total = differing + int((~same).sum()), total + same.numel()
    assert differing <= 0.01 * total, (differing, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_steps_int8_moments_like_the_reference_loop(dtype, launches):
    """int8 moments on CUDA take the Triton kernel by default; AdamW's moments do not read
    θ, so with the same gradients the codes and scales are the reference loop's bit for bit
    (float32 θ, or compensated bfloat16 θ's float32 master weight)."""
    options = {"lr": 1e-3, "weight_decay": 0.1, "state_dtype": "int8"}
    reference_params, params = make_params(dtype), make_params(dtype)
    reference = run(decoupled.AdamW, reference_params, fused=False, **options)
    ours = run(decoupled.AdamW, params, **options)
    assert launches["adam_kernel"] == 5
    for p, q in zip(params, reference_params):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            assert torch.equal(ours.state[p][key], reference.state[q][key]), key
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_size", [1e-21, 1e-12, 1e18])
def test_compiled_int8_codes_match_the_reference_at_extreme_magnitudes(grad_size):
    """Tiny gradients make v subnormal (1e-21: v near 1e-45), huge ones m near 1e18: the GPU
    must neither flush subnormals nor fuse a product into a sum where the reference does
    not, so codes and scales are the reference loop's bit for bit (β1 = 0: m is g)."""
    options = {"lr": 1e-3, "betas": (0.0, 0.999), "state_dtype": "int8"}
    reference_params, params = make_params(), make_params()
    reference = run(decoupled.AdamW, reference_params, grad_size=grad_size, fused=False, **options)
    ours = run(decoupled.AdamW, params, grad_size=grad_size, **options)
    for p, q in zip(params, reference_params):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            assert torch.equal(ours.state[p][key], reference.state[q][key]), key


@pytest.mark.parametrize("capturable", [False, True])
def test_step_does_not_synchronize_with_the_host(capturable):
    params = make_params()
    options = {"capturable": True, "skip_nonfinite": True} if capturable else {}
    lr = torch.tensor(1e-3, device="cuda") if capturable else 1e-3
    optimizer = run(decoupled.AdamW, params, steps=2, lr=lr, **options)  # tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optimizer.state[params[0]]["step"].device.type == "cuda"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)
    ).cuda()


def test_a_captured_training_step_replays_like_eager_steps():
    """torch's recipe (CUDA semantics, "whole-network capture"): warm up on a side stream,
    capture forward + backward + step, replay with new data copied into the static inputs."""
    inputs = [torch.randn(16, 32, device="cuda") for _ in range(6)]
    targets = [torch.randn(16, 8, device="cuda") for _ in range(6)]

    def step(model, optimizer, x, y):
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    eager_model = _model()
    lr = torch.tensor(1e-2, device="cuda")
    eager = decoupled.AdamW(eager_model.parameters(), lr=lr.clone(), capturable=True)
    for x, y in zip(inputs, targets):
        step(eager_model, eager, x, y)

    model = _model()
    optimizer = decoupled.AdamW(model.parameters(), lr=lr.clone(), capturable=True)
    static_x, static_y = inputs[0].clone(), targets[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, launch tables and kernels compiled
        step(model, optimizer, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, optimizer, static_x, static_y)
    for x, y in zip(inputs[1:], targets[1:]):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    # capturing records kernels without running them: warm-up + 5 replays = 6 steps
    assert float(optimizer.state[next(model.parameters())]["step"]) == 6.0
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_benchmark_smoke():
    from decoupled.bench_device import run as bench

    text = bench(["resnet50"], "cuda", steps=2, rounds=1)
    assert "copy bandwidth" in text and "decoupled triton bf16" in text
    assert "whole training step" in text


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_stepping_in_backward_on_the_gpu_equals_backward_then_step(state_dtype):
    """The hooks run in the GPU's autograd thread; the Triton update per parameter gives the
    result of step() bit for bit (bfloat16 θ, compensated)."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))
    nets = [net.to("cuda", torch.bfloat16), copy.deepcopy(net.to("cuda", torch.bfloat16))]
    optimizers = [decoupled.AdamW(n.parameters(), lr=1e-3, state_dtype=state_dtype) for n in nets]
    steps = decoupled.optim.step_in_backward(optimizers[0])
    for step in range(4):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
        x = x.to("cuda", torch.bfloat16)
        for n in nets:
            n(x).float().square().mean().backward()
        optimizers[1].step()
        optimizers[1].zero_grad()
    steps.remove()
    assert all(p.grad is None for p in nets[0].parameters())
    assert_same_training_state(*optimizers, *nets)
