"""The fast paths (the one-pass C++ kernel, torch's fused kernels) against the reference loop.

Every case runs two optimizers on twin parameters fed the same gradients, one on a fast path
and one with ``fused=False``, and compares parameters and every state tensor after 100 steps
(float32: relative 1e-6, float64: 1e-12). The gradients come from a fixed random stream, not
from the parameters, so the comparison measures the kernels' rounding and not its
amplification by a chaotic training trajectory. Each case also checks which path ran, and
that the C++ kernel accepted its steps (``path_log`` in ``conftest.py``), so a silent
fallback to the reference loop cannot pass for the fast path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupled
from decoupled.optim import _build, _kernels
from tests.helpers import train, twin_models
from tests.optim.optim_db import cases

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (1,), (40_000,)]  # the last spans two kernel chunks

# every entry's fast-path rows on every path compared with the reference loop, per dtype
FAST_CASES = cases(inputs="fast_inputs", dtypes=True)
KERNEL_CASES = cases(inputs="fast_inputs", paths=lambda path: path.name == "kernel")


class Params(torch.nn.Module):
    def __init__(self, dtype, shapes=SHAPES):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.tensors = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in shapes
        )


def run_both(
    cls, kwargs, dtype, steps=100, fused=None, shapes=SHAPES, scheduler=True, path_kwargs=None
):
    """(fast optimizer, reference optimizer, fast params, reference params)."""
    model_fast, model_reference = Params(dtype, shapes), Params(dtype, shapes)
    kwargs = {"lr": 1e-2, **kwargs}
    fast_kwargs = {"fused": fused} if path_kwargs is None else path_kwargs
    fast = cls(model_fast.parameters(), **fast_kwargs, **copy.deepcopy(kwargs))  # own tensor lr
    reference = cls(model_reference.parameters(), fused=False, **kwargs)
    make = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps)  # noqa: E731
    schedulers = [make(o) for o in (fast, reference)] if scheduler else []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p_f, p_r in zip(model_fast.parameters(), model_reference.parameters()):
            grad = torch.randn(p_f.shape, generator=generator, dtype=dtype)
            p_f.grad, p_r.grad = grad.clone(), grad.clone()
        fast.step()
        reference.step()
        for s in schedulers:
            s.step()
    return fast, reference, list(model_fast.parameters()), list(model_reference.parameters())


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_paths(fast, reference, params_f, params_r, tolerance):
    """Relative error of the whole parameter vector and of each state vector (‖Δ‖∞/‖x‖∞): a
    single entry crossing zero has no meaningful relative error of its own."""
    assert relative_error(flat(params_f), flat(params_r)) <= tolerance
    for key, value in reference.state[params_r[0]].items():
        if key == "step":
            assert all(fast.state[p]["step"] == reference.state[q]["step"]
                       for p, q in zip(params_f, params_r))  # fmt: skip
        elif torch.is_tensor(value):
            state_f = flat(fast.state[p][key] for p in params_f)
            state_r = flat(reference.state[p][key] for p in params_r)
            assert relative_error(state_f, state_r) <= tolerance, key


def test_the_kernel_builds_on_this_machine():
    assert _kernels.kernel_ops() is not None


@pytest.mark.parametrize("info,path,inp,dtype", FAST_CASES)
def test_fast_path_matches_the_reference_loop(info, path, inp, dtype, path_log, monkeypatch):
    if path.hide_kernel:
        monkeypatch.setattr(_build, "_ops", None)
    kwargs = inp.kwargs
    results = run_both(info.cls, kwargs, dtype, path_kwargs=path.kwargs)
    assert set(path_log[::2]) == {path.logged(info.family)}
    assert_close_paths(*results, tolerance(kwargs, dtype, path))


def tolerance(kwargs, dtype, path) -> float:
    """TOLERANCE, except for float64 θ with a float32 tensor lr on torch's fused kernel. torch's
    single-tensor loop, and so the reference loop, rounds the step size γ/(1 − β1ᵗ) to the
    lr's float32 (torch/optim/adam.py: ``step_size = lr / bias_correction1``); the fused kernel
    takes it in float64. After 100 steps θ parts by 6e-10 of its largest entry (measured)."""
    lr = kwargs.get("lr")
    float32_step = torch.is_tensor(lr) and lr.dtype == torch.float32 and dtype == torch.float64
    return 1e-8 if float32_step and path.name == "torch-fused" else TOLERANCE[dtype]


# Adam's L2 term carries θ's ulps (see below) into its moments: not bitwise there
BITWISE_CASES = [
    case
    for case in KERNEL_CASES
    if case.values[0].cls is not decoupled.Adam or not case.values[2].kwargs.get("weight_decay")
]


@pytest.mark.parametrize("info,path,inp", BITWISE_CASES)
def test_kernel_rounds_as_torch_where_torch_fuses_multiply_adds(info, path, inp, path_log):
    """The kernel fuses a multiply and an add exactly where torch's vectorized loops do, so
    SGD/SGDW and Adam's moments are bit-identical to the reference loop (hence to torch.optim's
    single-tensor path). Adam's θ may differ by an ulp: torch's sqrt is not always correctly
    rounded."""
    fast, reference, params_f, params_r = run_both(
        info.cls, inp.kwargs, torch.float32, steps=20, path_kwargs=path.kwargs
    )
    assert "(refused)" not in " ".join(path_log)
    if info.family == "sgd":
        assert all(torch.equal(p, q) for p, q in zip(params_f, params_r))
    for key in reference.state[params_r[0]].keys() - {"step", "init_param"}:
        assert all(torch.equal(fast.state[p][key], reference.state[q][key])
                   for p, q in zip(params_f, params_r)), key  # fmt: skip


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.SGDW])
def test_without_a_fast_path_the_reference_loop_steps(cls, path_log, without_kernel):
    """decay_to="init" has no torch kernel and SGD none at all: same code, same bits."""
    fast, reference, params_f, params_r = run_both(cls, {"decay_to": "init"}, torch.float32)
    assert set(path_log) == {"adam_update" if cls is decoupled.Adam else "sgd_update"}
    assert all(torch.equal(p, q) for p, q in zip(params_f, params_r))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    optimizer=st.sampled_from(["Adam", "AdamW", "SGD", "SGDW"]),
    lr=st.floats(1e-4, 0.05),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.9, 0.9999),
    momentum=st.floats(0.0, 0.99),
    weight_decay=st.floats(0.0, 1.0),
    flag=st.booleans(),
    decay_scale=st.sampled_from(decoupled.DECAY_SCALES),
    decay_to=st.sampled_from(["zero", "init"]),
)
def test_property_kernel_matches_reference(
    optimizer, lr, beta1, beta2, momentum, weight_decay, flag, decay_scale, decay_to, path_log
):
    path_log.clear()  # one log for all examples
    cls = getattr(decoupled, optimizer)
    kwargs = dict(lr=lr, weight_decay=weight_decay, decay_to=decay_to)
    if optimizer.startswith("Adam"):
        kwargs.update(betas=(beta1, beta2), amsgrad=flag)
    else:
        kwargs.update(momentum=momentum, nesterov=flag and momentum > 0)
    if optimizer.endswith("W"):
        kwargs["decay_scale"] = decay_scale
    results = run_both(cls, kwargs, torch.float32, steps=30, shapes=SHAPES[:4])
    assert set(path_log[::2]) == {"kernel_adam_update" if "Adam" in optimizer
                                  else "kernel_sgd_update"}  # fmt: skip
    assert_close_paths(*results, TOLERANCE[torch.float32])


def test_group_layouts_mixed_dtypes_layouts_and_missing_grads(path_log):
    """Several groups with their own hyperparameters; a float64 group (torch's fused kernel),
    channels_last and transposed (non-contiguous) tensors, a parameter without a gradient."""

    def build():
        generator = torch.Generator().manual_seed(0)
        make = lambda *s, dtype=torch.float32: torch.nn.Parameter(  # noqa: E731
            torch.randn(*s, generator=generator, dtype=dtype)
        )
        conv = make(8, 3, 3, 3)
        conv.data = conv.data.contiguous(memory_format=torch.channels_last)
        transposed = torch.nn.Parameter(make(6, 5).data.t())
        return [conv, transposed, make(7), make(5, dtype=torch.float64), make(3)]

    models = [build(), build()]
    optimizers = [
        decoupled.AdamW(
            [
                {"params": m[:2], "weight_decay": 0.3, "amsgrad": True},
                {"params": m[2:3], "lr": 0.05, "decay_scale": "schedule"},
                {"params": m[3:], "weight_decay": 0.0},
            ],
            lr=1e-2,
            fused=fused,
        )
        for m, fused in zip(models, (None, False))
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        for p_f, p_r in zip(*models):
            if p_f is models[0][-1]:
                continue  # never gets a gradient: never touched
            grad = torch.randn(p_f.shape, generator=generator, dtype=p_f.dtype)
            p_f.grad = grad.clone(memory_format=torch.preserve_format)
            p_r.grad = grad.clone(memory_format=torch.preserve_format)
        for optimizer in optimizers:
            optimizer.step()
    assert "kernel_adam_update" in path_log and "fused_adam_update" in path_log
    fast, reference = optimizers
    for p_f, p_r in zip(*models):
        tolerance = TOLERANCE[p_f.dtype]
        assert relative_error(flat([p_f]), flat([p_r])) <= tolerance
        assert fast.state[p_f].keys() == reference.state[p_r].keys()
        for key, value in reference.state[p_r].items():
            assert relative_error(flat([fast.state[p_f][key]]), flat([value])) <= tolerance


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGD], ids=lambda c: c.__name__)
def test_a_gradient_laid_out_unlike_its_parameter_still_takes_the_kernel(cls, monkeypatch):
    """A contiguous gradient of a channels_last weight (as some layers produce) is copied into
    the weight's layout for the kernel instead of sending the group to the reference loop;
    the result equals the reference loop's."""
    import decoupled.optim.adam as adam_module
    import decoupled.optim.sgd as sgd_module

    def weights():
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(8, 3, 3, 3, generator=generator)
        return [torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))]

    kwargs = {
        "lr": 0.01,
        "weight_decay": 0.1,
        **({"momentum": 0.9} if cls is decoupled.SGD else {}),
    }
    fast_params, reference_params = weights(), weights()
    fast = cls(fast_params, **kwargs)
    reference = cls(reference_params, fused=False, **kwargs)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(8, 3, 3, 3, generator=generator) for _ in range(5)]  # contiguous
    for grad in grads:
        reference_params[0].grad = grad.clone()
        reference.step()

    def no_reference_loop(*args, **kwargs):
        raise AssertionError("the reference loop ran")

    monkeypatch.setattr(adam_module, "adam_update", no_reference_loop)
    monkeypatch.setattr(sgd_module, "sgd_update", no_reference_loop)
    for grad in grads:
        fast_params[0].grad = grad.clone()
        assert not fast_params[0].grad.is_contiguous(memory_format=torch.channels_last)
        fast.step()
    assert relative_error(flat(fast_params), flat(reference_params)) <= TOLERANCE[torch.float32]


def test_the_kernel_changes_nothing_when_it_refuses_a_tensor():
    ops = _kernels.kernel_ops()
    params = [torch.ones(4), torch.ones(3)]
    grads = [torch.ones(4), torch.ones(3, dtype=torch.float64)]  # the second is refused
    moments = [[torch.zeros(4), torch.zeros(3)] for _ in range(2)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    done = ops.adam_step_(
        params,
        grads,
        *moments,
        [],
        [],
        steps,
        0.1,
        0.9,
        0.999,
        1e-8,
        0.0,
        0.0,
        True,
        False,
        False,
        1024.0,  # a loss scale: refused, so the gradients stay scaled too
        False,  # cautious
        False,  # a float lr
        0,  # the first tensor's position in the optimizer
    )
    assert done is False
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert all(s.item() == 0 for s in steps) and all(not m.any() for pair in moments for m in pair)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_state_dict_round_trips_between_paths(path_log):
    """Kernel → reference → torch.optim and back: the state is the same torch-format dict."""
    model, model_copy, shape = twin_models("mlp", torch.float32)
    fast = decoupled.AdamW(model.parameters(), lr=1e-2)
    train(model, fast, shape, 20, torch.float32)
    assert set(path_log) == {"kernel_adam_update"}
    saved = fast.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    model_copy.load_state_dict(model.state_dict())
    reference = decoupled.AdamW(model_copy.parameters(), lr=1e-2, fused=False)
    reference.load_state_dict(copy.deepcopy(saved))
    torch_optimizer = torch.optim.AdamW(model_copy.parameters(), lr=1e-2)
    torch_optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))
    back = decoupled.AdamW(model.parameters(), lr=1e-2)
    back.load_state_dict(torch_optimizer.state_dict())
    for p, q in zip(model.parameters(), model_copy.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[p][key], fast.state[p][key])
            assert torch.equal(torch_optimizer.state[q][key], fast.state[p][key])


def test_the_kernel_bumps_versions_so_autograd_sees_the_change(path_log):
    """As torch's in-place ops: stepping between forward and backward is an error."""
    for optimizer_class in (decoupled.AdamW, decoupled.SGD):
        weight = torch.nn.Parameter(torch.randn(4, 4))
        optimizer = (
            optimizer_class([weight], lr=0.1, momentum=0.9)
            if optimizer_class is (decoupled.SGD)
            else optimizer_class([weight], lr=0.1)
        )
        loss = (weight * weight).sum()
        weight.grad = torch.randn(4, 4)
        optimizer.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert path_log == ["kernel_adam_update", "kernel_sgd_update"]


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_shared_memory_parameters_take_the_reference_loop(cls, path_log):
    """Two parameters over one storage (views) must not be updated by two threads at once:
    the kernel refuses them and the result is the reference loop's, bit for bit."""

    def build():
        base = torch.arange(2 * 70_000, dtype=torch.float32) / 70_000
        return [torch.nn.Parameter(base[:70_000]), torch.nn.Parameter(base[35_000:105_000])]

    ours, reference = build(), build()
    optimizers = [cls(ps, lr=0.1, weight_decay=0.1, fused=f)
                  for ps, f in ((ours, None), (reference, False))]  # fmt: skip
    for step in range(3):
        for p, q in zip(ours, reference):
            p.grad = torch.full_like(p, step + 1.0)
            q.grad = torch.full_like(q, step + 1.0)
        for optimizer in optimizers:
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, reference))
    family = "sgd" if issubclass(cls, decoupled.SGD) else "adam"
    assert path_log[::2] == [f"kernel_{family}_update (refused)"] * 3


def test_amsgrad_keeps_a_nan_maximum_like_torch_maximum(path_log):
    for fused in (None, False):
        theta = torch.nn.Parameter(torch.ones(3))
        optimizer = decoupled.Adam([theta], amsgrad=True, fused=fused)
        theta.grad = torch.ones(3)
        optimizer.step()
        optimizer.state[theta]["max_exp_avg_sq"][0] = float("nan")
        optimizer.step()
        assert optimizer.state[theta]["max_exp_avg_sq"][0].isnan(), fused
    assert path_log == ["kernel_adam_update"] * 2 + ["adam_update"] * 2


def test_bfloat16_state_stores_nonfinite_moments_as_the_reference_bit_for_bit(path_log):
    """NaN and ±inf gradients (a negative NaN among them) in bfloat16 state: every NaN moment
    is stored as the quiet 0x7FC0 (also m of an infinite gradient at the second step, where
    the lerp meets ∞ − ∞), v of an infinite gradient as +∞, the rest stochastically rounded."""
    grad = torch.linspace(-3, 3, 1000)
    grad[[5, 300, 301, 999]] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    grad[7] = -torch.tensor(float("nan"))
    states = []
    for fused in (None, False):
        theta = torch.nn.Parameter(torch.ones(1000))
        optimizer = decoupled.AdamW([theta], lr=0.1, state_dtype=torch.bfloat16, fused=fused)
        for _ in range(2):
            theta.grad = grad.clone()
            optimizer.step()
        states.append(optimizer.state[theta])
    for key in ("exp_avg", "exp_avg_sq"):
        ours, reference = (state[key].view(torch.int16) for state in states)
        assert torch.equal(ours, reference), key
        assert ours[5] == ours[7] == 0x7FC0
    m, v = (states[0][key].view(torch.int16) for key in ("exp_avg", "exp_avg_sq"))
    assert m[300] == m[301] == 0x7FC0 and v[300] == v[301] == 0x7F80
    assert path_log == ["kernel_adam_update"] * 2 + ["adam_update"] * 2


def test_no_kernel_build_for_parameters_it_cannot_take(monkeypatch):
    monkeypatch.setattr(_kernels, "kernel_ops", lambda: pytest.fail("kernel consulted"))
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not _kernels._kernel_applies(meta, 0.1)
    assert not _kernels._kernel_applies([torch.nn.Parameter(torch.zeros(3).double())], 0.1)


def test_a_failed_build_warns_once_and_steps_go_on(monkeypatch, tmp_path):
    broken = tmp_path / "kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(_build, "_SOURCES", [broken])
    monkeypatch.setattr(_build, "_ops", _build._NOT_TRIED)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _build.kernel_ops() is None
    assert _build.kernel_ops() is None  # tried once per process
    theta = torch.nn.Parameter(torch.ones(3))
    optimizer = decoupled.AdamW([theta], lr=0.1)
    theta.grad = torch.ones(3)
    optimizer.step()  # torch's fused kernel instead
    assert theta.lt(1).all()


def test_decoupled_no_kernel_never_builds(monkeypatch):
    monkeypatch.setattr(_build, "_ops", _build._NOT_TRIED)
    monkeypatch.setenv("DECOUPLED_NO_KERNEL", "1")
    assert _build.kernel_ops() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, "int8"], ids=str)
@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW], ids=lambda c: c.__name__)
def test_tensor_lr_and_betas_step_as_the_reference_loop_bit_for_bit(
    cls, state_dtype, dtype, exact_sqrt, path_log
):
    """With a tensor lr the reference divides it by 1 − β1ᵗ in float32 (torch's tensor
    arithmetic); the kernel does the same. With tensor betas, whose powers the reference takes
    in float32 too, the group steps in the reference loop. (Found differing by 1-2 ulp.)"""
    for lr, betas in (
        (torch.tensor(0.01), (0.9, 0.999)),
        (0.01, tuple(map(torch.tensor, (0.9, 0.999)))),
    ):
        generator = torch.Generator().manual_seed(0)
        start = torch.randn(3000, generator=generator).to(dtype)
        fast, reference = (torch.nn.Parameter(start.clone()) for _ in range(2))
        kwargs = {"lr": lr, "betas": betas, "weight_decay": 0.1, "state_dtype": state_dtype}
        optimizers = [cls([fast], **copy.deepcopy(kwargs)), cls([reference], fused=False, **kwargs)]
        path_log.clear()
        for _ in range(5):
            grad = torch.randn(3000, generator=generator).to(dtype)
            for param, optimizer in zip((fast, reference), optimizers):
                param.grad = grad.clone()
                optimizer.step()
        tensor_betas = isinstance(betas[0], torch.Tensor)
        assert ("kernel_adam_update" in path_log) != tensor_betas
        assert torch.equal(fast, reference)
        for key, value in optimizers[1].state[reference].items():
            assert torch.equal(optimizers[0].state[fast][key], value), key


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGD], ids=lambda c: c.__name__)
def test_gradients_unscaled_in_a_relaid_copy_are_written_back(cls, exact_sqrt):
    """GradScaler's step divides the gradients by the scale in place; where the kernel stepped
    with a copy in the weight's layout, the copy's values go back to ``.grad``."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=generator)
    weight = weight.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 3, 3, 3, generator=generator)  # contiguous
    results = []
    for fused in (None, False):
        param = torch.nn.Parameter(weight.clone())
        optimizer = cls(
            [param], lr=0.01, fused=fused, **({"momentum": 0.9} if cls is decoupled.SGD else {})
        )
        optimizer.grad_scale = torch.tensor(4.0)
        param.grad = grad.clone()
        optimizer.step()
        results.append((param.detach(), param.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], grad / 4) and torch.equal(results[1][1], grad / 4)
