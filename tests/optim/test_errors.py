"""Bad input: a table of (optimizer, kwargs, error type, message regex)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import decoupled

ADAMS = (decoupled.Adam, decoupled.AdamW)
SGDS = (decoupled.SGD, decoupled.SGDW)
DECOUPLED = (decoupled.AdamW, decoupled.SGDW)

ERROR_TABLE = [
    (ADAMS + SGDS, {"lr": -0.1}, ValueError, r"Invalid lr value: -0\.1"),
    (ADAMS + SGDS, {"lr": math.inf}, ValueError, r"Invalid lr value: inf"),
    (ADAMS + SGDS, {"lr": math.nan}, ValueError, r"Invalid lr value: nan"),
    (
        ADAMS + SGDS,
        {"lr": torch.tensor([0.1, 0.2])},
        ValueError,
        r"lr value: tensor of shape \(2,\)",
    ),
    (ADAMS + SGDS, {"lr": "0.1"}, ValueError, r"Invalid lr value: '0\.1' \(must be a number\)"),
    (ADAMS + SGDS, {"weight_decay": "a"}, ValueError, r"Invalid weight_decay value: 'a'"),
    (ADAMS + SGDS, {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0\.1"),
    (ADAMS + SGDS, {"weight_decay": math.nan}, ValueError, r"Invalid weight_decay value: nan"),
    (ADAMS, {"eps": -1e-8}, ValueError, r"Invalid eps value: -1e-08"),
    (ADAMS, {"betas": (1.0, 0.999)}, ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    (ADAMS, {"betas": (0.9, -0.1)}, ValueError, r"Invalid beta parameter at index 1: -0\.1"),
    (ADAMS, {"betas": (0.9, 1.5)}, ValueError, r"Invalid beta parameter at index 1: 1\.5"),
    (
        ADAMS,
        {"betas": (0.9, torch.tensor(0.99))},
        ValueError,
        r"either both floats or both Tensors",
    ),
    (
        ADAMS,
        {"betas": (torch.ones(2) / 2, torch.tensor(0.9))},
        ValueError,
        r"betas\[0\] must be 1-",
    ),
    (
        ADAMS,
        {"lr": torch.tensor(0.01), "foreach": True},
        ValueError,
        r"lr as a Tensor is not supported for capturable=False and foreach=True",
    ),
    (ADAMS, {"betas": (0.9, 0.99, 0.9)}, ValueError, r"Invalid betas value: \(0\.9, 0\.99, 0\.9\)"),
    (ADAMS, {"eps": math.nan}, ValueError, r"Invalid eps value: nan"),
    (ADAMS, {"capturable": True, "fused": False}, ValueError, r"Invalid capturable value: True"),
    (
        ADAMS + SGDS,
        {"differentiable": True, "fused": True},
        RuntimeError,
        r"`fused` does not support `differentiable`",
    ),
    (ADAMS + SGDS, {"foreach": True, "fused": True}, ValueError, r"Invalid foreach value"),
    (
        ADAMS + SGDS,
        {"foreach": True, "fused": True},
        RuntimeError,  # torch's type for it
        r"`fused` and `foreach` cannot be `True` together",
    ),
    (DECOUPLED, {"max_lr": 0.0}, ValueError, r"Invalid max_lr value: 0\.0"),
    (DECOUPLED, {"decay_period": 0.5}, ValueError, r"decay_period value: 0\.5"),
    (DECOUPLED, {"decay_period": "9"}, ValueError, r"decay_period value: '9'"),
    (DECOUPLED, {"lambda_norm": "a"}, ValueError, r"lambda_norm value: 'a'"),
    (SGDS, {"momentum": -0.9}, ValueError, r"Invalid momentum value: -0\.9"),
    (SGDS, {"momentum": math.inf}, ValueError, r"Invalid momentum value: inf"),
    (SGDS, {"nesterov": True}, ValueError, r"Invalid nesterov value: True with momentum=0"),
    (SGDS, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, r"dampening=0\.1"),
]

CASES = [
    pytest.param(cls, kwargs, error, regex, id=f"{cls.__name__}-{sorted(kwargs)}-{regex[:24]}")
    for classes, kwargs, error, regex in ERROR_TABLE
    for cls in classes
]


@pytest.mark.parametrize("cls,kwargs,error,regex", CASES)
def test_construction_errors(cls, kwargs, error, regex):
    with pytest.raises(error, match=regex):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


ALL = ADAMS + SGDS


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_single_tensor_is_refused(cls):
    with pytest.raises(TypeError, match="single torch.FloatTensor; wrap it in a list"):
        cls(torch.nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_empty_parameters_are_refused(cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        cls(p for p in [])


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_same_parameter_in_two_groups_is_refused(cls):
    shared = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [shared]}, {"params": [shared]}])


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_sparse_gradients_are_refused_at_step(cls):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = cls(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        optimizer.step()


GROUP_ERRORS = [
    (ADAMS, {"betas": (1.5, 0.9)}, r"Invalid beta parameter at index 0: 1\.5"),
    (ADAMS, {"eps": -1.0}, r"Invalid eps value: -1\.0"),
    (SGDS, {"momentum": -1.0}, r"Invalid momentum value: -1\.0"),
    (SGDS, {"nesterov": True}, r"Invalid nesterov value: True with momentum=0"),
    (ALL, {"lr": -1.0}, r"Invalid lr value: -1\.0"),
    (
        (decoupled.Adam, decoupled.SGD),
        {"lambda_norm": 0.05},
        r"lambda_norm value: 0\.05 \(only for",
    ),
    ((decoupled.Adam, decoupled.SGD), {"decay_scale": "lr"}, r"decay_scale value: 'lr' \(only for"),
]
GROUP_CASES = [
    pytest.param(cls, group, regex, id=f"{cls.__name__}-{sorted(group)}")
    for classes, group, regex in GROUP_ERRORS
    for cls in classes
]


@pytest.mark.parametrize("cls,group,regex", GROUP_CASES)
def test_a_refused_param_group_leaves_the_optimizer_as_it_was(cls, group, regex):
    """Every group is checked like the defaults, and a refused add_param_group adds nothing:
    the optimizer keeps stepping its other groups."""
    kept = torch.nn.Parameter(torch.ones(2))
    optimizer = cls([kept], lr=0.1)
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=regex):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **group})
    assert optimizer.state_dict() == before and len(optimizer.param_groups) == 1
    kept.grad = torch.ones(2)
    optimizer.step()
    assert not torch.equal(kept.detach(), torch.ones(2))
    with pytest.raises(ValueError, match=regex):  # the same group given at construction
        cls([{"params": [torch.nn.Parameter(torch.ones(2))], **group}], lr=0.1)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_step_that_raises_changes_nothing_and_does_not_count(cls):
    """A λ schedule returning a bad value in the second group raises before the first group
    moves, and the failed step does not advance the step count a schedule reads."""
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = cls([{"params": [first]}, {"params": [second], "weight_decay": lambda t: -1.0}])
    for _ in range(3):
        first.grad, second.grad = torch.ones(2), torch.ones(2)
        with pytest.raises(ValueError, match=r"Invalid weight_decay value: -1\.0 .* at step 1"):
            optimizer.step()
    assert torch.equal(first.detach(), torch.ones(2)) and not optimizer.state
    assert [group["decay_steps"] for group in optimizer.param_groups] == [0, 0]


@pytest.mark.parametrize(
    "path", [{"fused": False}, {}, {"state_dtype": "int8"}], ids=["reference", "kernel", "int8"]
)
@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "betas,message",
    [
        ((0.9, -0.1), "Invalid beta parameter at index 1: -0.1"),
        ((1.0, 0.999), "Invalid beta parameter at index 0: 1.0"),
        (0.9, "Invalid betas value: 0.9"),
        ((0.9, torch.tensor(0.999)), "either both floats or both Tensors"),
    ],
)
def test_betas_changed_after_construction_are_refused_at_the_step(cls, path, betas, message):
    """torch would step with them (β2 < 0: v negative, θ NaN, and the int8 kernel would code
    the NaN root differently from the reference loop); here the step raises, naming the
    value, before any group moves, and the state already stored is kept as it was."""
    first, second = torch.nn.Parameter(torch.ones(300)), torch.nn.Parameter(torch.ones(300))
    optimizer = cls([{"params": [first]}, {"params": [second]}], lr=0.1, **path)
    first.grad, second.grad = torch.ones(300), torch.ones(300)
    optimizer.step()
    saved = {key: value.clone() for key, value in optimizer.state[first].items()}
    before = first.detach().clone(), second.detach().clone()
    optimizer.param_groups[1]["betas"] = betas
    with pytest.raises(ValueError, match=re.escape(message)):
        optimizer.step()
    assert torch.equal(first.detach(), before[0]) and torch.equal(second.detach(), before[1])
    assert all(torch.equal(optimizer.state[first][k], v) for k, v in saved.items())


def test_unknown_keywords_and_whole_number_periods():
    param = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError, match="unexpected keyword argument.*capturable"):
        decoupled.SGD(param, capturable=False)  # torch's SGD has no such argument either
    assert decoupled.SGDW(param, lambda_norm=0.05, decay_period=100.0).step() is None


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_torch_implementation_switches_are_accepted(cls):
    """torch code passes foreach=...; foreach=False (torch's single-tensor loop) selects our
    reference loop, which equals it bit for bit."""
    param = [torch.nn.Parameter(torch.ones(2))]
    assert cls(param, foreach=False).param_groups[0]["fused"] is False
    assert cls(param, foreach=True).param_groups[0]["fused"] is None
    assert cls(param, foreach=False, fused=True).param_groups[0]["fused"] is True
    assert cls(param, differentiable=False).param_groups[0]["fused"] is None


def test_hyperparameters_are_checked_before_params_as_in_torch():
    """torch checks the hyperparameters before it reads ``params``: with ``params=None`` the
    bad value's ValueError comes first, not the TypeError about params."""
    for cls in ALL:
        with pytest.raises(ValueError, match=r"Invalid weight_decay value: -1"):
            cls(None, weight_decay=-1)
        with pytest.raises(ValueError, match=r"Tensor lr must be 1-element"):
            cls(None, lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_eps_zero_is_accepted_with_a_warning_as_torch_accepts_it(cls):
    """torch.optim.Adam accepts eps=0; a weight whose gradients were all 0 then divides 0 by 0,
    which the warning says."""
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="eps=0"):
        optimizer = cls([param], eps=0.0)
    assert optimizer.param_groups[0]["eps"] == 0.0
    torch.optim.Adam([param], eps=0.0)  # torch's twin takes it


@pytest.mark.parametrize("cls", SGDS, ids=lambda c: c.__name__)
def test_dampening_outside_zero_one_is_accepted_with_a_warning_as_torch_accepts_it(cls):
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match=r"dampening=2\.0 is outside \[0, 1\]"):
        optimizer = cls([param], momentum=0.9, dampening=2.0)
    torch.optim.SGD([param], momentum=0.9, dampening=2.0)  # torch's twin takes it
    for _ in range(2):
        param.grad = torch.ones(2)
        optimizer.step()
    # b_1 = g, b_2 = 0.9·g + (1 − 2)·g = −0.1·g: θ = 1 − 0.001·(1 − 0.1)
    torch.testing.assert_close(param.detach(), torch.full((2,), 1 - 0.001 * 0.9))


FUSED_REFUSALS = [
    pytest.param(torch.ones(2, device="meta"), "torch.float32 and meta", id="meta"),
    pytest.param(torch.ones(2, dtype=torch.complex64), "torch.complex64 and cpu", id="complex"),
]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tensor,named", FUSED_REFUSALS)
def test_fused_true_refuses_what_torchs_fused_kernels_cannot_take(cls, tensor, named):
    """As torch: the step raises a RuntimeError naming the requirement, before any change."""
    param = torch.nn.Parameter(tensor)
    optimizer = cls([param], fused=True)
    param.grad = torch.ones_like(param)
    with pytest.raises(
        RuntimeError,
        match=rf"`fused=True` requires all the params to be floating point Tensors of "
        rf"supported devices: .* but {named}",
    ):
        optimizer.step()
    assert not optimizer.state or all(not s for s in optimizer.state.values())
    torch_cls = getattr(
        torch.optim, cls.__name__.removesuffix("W") if cls in SGDS else cls.__name__
    )
    twin = torch_cls([torch.nn.Parameter(tensor.clone())], fused=True)
    twin.param_groups[0]["params"][0].grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match=rf"but {named}"):
        twin.step()


def test_a_groups_own_state_dtype_and_compensate_are_checked_as_the_constructors():
    """A param group may choose its own moments and compensation: names become dtypes, bad
    values and int8 with amsgrad are refused when the group is added, not at the first step."""
    p = torch.nn.Parameter(torch.randn(300))
    optimizer = decoupled.AdamW([{"params": [p], "state_dtype": "int8"}])
    assert optimizer.param_groups[0]["state_dtype"] == torch.int8
    p.grad = torch.randn(300)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.int8
    with pytest.raises(ValueError, match="Invalid state_dtype value: int4"):
        decoupled.AdamW([{"params": [p], "state_dtype": "int4"}])
    with pytest.raises(ValueError, match="int8 with amsgrad=True"):
        decoupled.Adam([{"params": [p], "state_dtype": "int8", "amsgrad": True}])
    for cls in (decoupled.AdamW, decoupled.SGD):
        with pytest.raises(ValueError, match="Invalid compensate value: 'yes'"):
            cls([{"params": [p], "compensate": "yes"}], lr=0.1)
