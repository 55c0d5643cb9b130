"""The drop-in check: torch's own optimizer database run against our classes.

torch ships the table its optimizer tests are driven by,
``torch.testing._internal.common_optimizers.optim_db``: per optimizer, the constructor
configurations (``optim_inputs_func``, with the implementation flags ``foreach``/``fused``/
``differentiable`` added by torch's own helper,
``_get_optim_inputs_including_global_cliquey_kwargs``) and the inputs that must fail
(``optim_error_inputs_func``). Here each Adam, AdamW and SGD row is given to our class and to
torch's, and the two are compared: every parameter and every state tensor after each of
several steps, on each of our paths (the reference loop, the default fast path, torch's fused
kernels where our dispatch takes them). The rows are read from the installed torch, so
configurations a later torch adds are checked without a change here.

A configuration is compared exactly where both sides run the same single-tensor loop (our
``fused=False`` against torch's ``foreach=False``/``differentiable=True``), and to float32
rounding where either side runs a fused kernel (``_kernels.py``'s module docstring says where
and why the paths round differently).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import decoupled

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's optimizer database imports expecttest (the dev extra installs it)",
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("Adam", "AdamW", "SGD")
STEPS = 10
IMPLEMENTATION_FLAGS = ("foreach", "fused", "differentiable")


def torch_info(name: str):
    return next(
        info for info in common_optimizers.optim_db if info.optim_cls is getattr(torch.optim, name)
    )


def configurations(name: str) -> list:
    """torch's rows for ``name`` on the CPU, each with the implementation flags torch's own
    tests add to it (all False, then each one True)."""
    info = torch_info(name)
    helper = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs
    return helper("cpu", torch.float32, info)


# How our class is told to step a configuration. "as-given": exactly torch's kwargs (what a
# drop-in receives). The others replace torch's foreach/fused flags by the choice of our path.
PATHS = {
    "as-given": None,
    "reference": {"fused": False},
    "default": {},
    "torch-fused": {"fused": True},  # with the C++ kernel hidden (Adam, AdamW only)
}


def cases() -> list:
    params = []
    for name in NAMES:
        for inp in configurations(name):
            is_base = not any(inp.kwargs.get(flag) for flag in IMPLEMENTATION_FLAGS)
            for path in PATHS:
                if path != "as-given" and not is_base:
                    continue  # the flag variants run as given; the paths vary the plain rows
                if path == "torch-fused" and name == "SGD":
                    continue  # our SGD's fast path is the C++ kernel only
                desc = inp.desc.replace(" ", "_")
                params.append(pytest.param(name, inp.kwargs, path, id=f"{name}-{desc}-{path}"))
    return params


def our_kwargs(kwargs: dict, path: str) -> dict:
    if PATHS[path] is None:
        return dict(kwargs)
    chosen = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    return chosen | PATHS[path]


def exact(kwargs: dict, path: str) -> bool:
    """Both sides run the single-tensor loop: ours on the reference path, torch's unless a
    fused or foreach kernel was asked for."""
    ours_reference = (
        path == "reference"
        or (path == "as-given" and kwargs.get("foreach") is False and not kwargs.get("fused"))
        or kwargs.get("differentiable")
    )
    torch_loop = not kwargs.get("fused") and not kwargs.get("foreach")
    return bool(ours_reference and torch_loop)


def make_params(
    differentiable: bool, with_complex: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A weight, a bias and, ``with_complex``, a complex tensor (torch's Adam and SGD take
    complex parameters). With ``differentiable`` the parameters are non-leaf copies of leaves,
    as in torch's differentiable-optimizer tests, so that autograd records the in-place
    update."""
    generator = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(5, 4, generator=generator),
        torch.randn(5, generator=generator),
        torch.randn(3, 2, dtype=torch.complex64, generator=generator),
    ][: 3 if with_complex else 2]
    if not differentiable:
        return [torch.nn.Parameter(leaf) for leaf in leaves], []
    leaves = [leaf.requires_grad_() for leaf in leaves]
    return [leaf.clone() for leaf in leaves], leaves


def grads_for(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]


def copy_kwargs(kwargs: dict) -> dict:
    return copy.deepcopy(kwargs)  # tensor lr/betas: each optimizer owns its own


def run(cls, kwargs: dict, with_complex: bool, steps: int = STEPS):
    differentiable = bool(kwargs.get("differentiable"))
    params, leaves = make_params(differentiable, with_complex)
    optimizer = cls(params, **copy_kwargs(kwargs))
    history = []
    for step in range(steps):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        optimizer.step()
        history.append(snapshot(optimizer, params))
    if differentiable:
        # through the real tensors only: torch's own step cannot be differentiated through a
        # complex amsgrad update (a view_as_real it saves is changed in place by the next step)
        real = [p for p in params if not p.is_complex()]
        loss = sum((p**2).sum() for p in real) + sum(
            (t**2).sum()
            for p in real
            for t in optimizer.state[p].values()
            if torch.is_tensor(t) and t.requires_grad
        )
        leaves = [leaf for leaf in leaves if not leaf.is_complex()]
        try:
            history.append(torch.autograd.grad(loss, leaves))
        except RuntimeError as error:  # torch's amsgrad step saves v, the next step changes it
            history.append(("backward refused", "modified by an inplace operation" in str(error)))
    return history


def snapshot(optimizer, params) -> list:
    values = []
    for p in params:
        state = optimizer.state[p]
        values.append(("param", p.detach().clone()))
        for key in sorted(state):
            value = state[key]
            values.append((key, value.detach().clone() if torch.is_tensor(value) else value))
    return values


def fast(kwargs: dict, path: str) -> bool:
    """Whether our step is meant to take a fast path. Only the others get a complex
    parameter too: the fast paths take real ones, and torch's fused kernels refuse complex
    ones."""
    if path == "as-given":
        return bool(kwargs.get("fused") or kwargs.get("foreach"))
    return path in ("default", "torch-fused")


def expected_update(name: str, kwargs: dict, path: str) -> str:
    """The update function our step must take, as ``path_log`` names it."""
    family = "sgd" if name == "SGD" else "adam"
    if not fast(kwargs, path):
        return f"{family}_update"
    if path != "torch-fused" and decoupled.optim.kernel_available():
        return f"kernel_{family}_update"
    return "fused_adam_update" if family == "adam" else "sgd_update"


@pytest.mark.parametrize("name,kwargs,path", cases())
def test_torch_configuration_matches_torch(name, kwargs, path, monkeypatch, path_log):
    expected = expected_update(name, kwargs, path)
    if path == "torch-fused":
        monkeypatch.setattr(decoupled.optim._build, "_ops", None)
    with_complex = not fast(kwargs, path)
    ours = run(getattr(decoupled, name), our_kwargs(kwargs, path), with_complex)
    assert set(path_log) == {expected}, f"our steps took {path_log}, not {expected}"
    theirs = run(getattr(torch.optim, name), kwargs, with_complex)
    tolerance = {"rtol": 0, "atol": 0} if exact(kwargs, path) else {}
    assert len(ours) == len(theirs)
    for step, (mine, torchs) in enumerate(zip(ours, theirs)):
        if isinstance(torchs, tuple):  # gradients through the steps (differentiable)
            if torchs[0] == "backward refused":
                assert mine == torchs, "torch refuses this backward pass; ours must too"
            else:
                torch.testing.assert_close(mine, torchs, **tolerance, msg=f"{name} gradients")
            continue
        assert [key for key, _ in mine] == [key for key, _ in torchs], f"state keys, step {step}"
        for (key, a), (_, b) in zip(mine, torchs):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m, k=key: f"{k}: {m}")


def error_cases() -> list:
    params = []
    for name in NAMES:
        info = torch_info(name)
        for index, error in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            desc = error.optimizer_error_input.desc.replace(" ", "_")
            params.append(pytest.param(name, error, id=f"{name}-{index}-{desc}"))
    return params


@pytest.mark.parametrize("name,error", error_cases())
def test_torch_error_input_fails_as_in_torch(name, error):
    """Each of torch's error inputs raises (or warns) with torch's type and message, at
    construction or at the step, as torch's ``test_errors`` expects of torch's class."""
    cls = getattr(decoupled, name)
    inp = error.optimizer_error_input
    construction = error.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
    expect_warning = issubclass(error.error_type, Warning)

    def act():
        optimizer = cls(inp.params, **copy_kwargs(inp.kwargs))
        if not construction:
            optimizer.step()

    if expect_warning:
        with pytest.warns(error.error_type, match=error.error_regex):
            act()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(error.error_type, match=error.error_regex):
                act()
