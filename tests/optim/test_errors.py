"""Bad input: a table of (optimizer, kwargs, error type, message regex)."""

from __future__ import annotations

import math

import pytest
import torch

import decoupled

ADAMS = (decoupled.Adam, decoupled.AdamW)
SGDS = (decoupled.SGD, decoupled.SGDW)

ERROR_TABLE = [
    (ADAMS + SGDS, {"lr": -0.1}, ValueError, r"Invalid lr value: -0\.1"),
    (ADAMS + SGDS, {"lr": math.inf}, ValueError, r"Invalid lr value: inf"),
    (ADAMS + SGDS, {"lr": math.nan}, ValueError, r"Invalid lr value: nan"),
    (ADAMS + SGDS, {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"Tensor lr must be 1-element"),
    (ADAMS + SGDS, {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0\.1"),
    (ADAMS + SGDS, {"weight_decay": math.nan}, ValueError, r"Invalid weight_decay value: nan"),
    (ADAMS, {"eps": 0.0}, ValueError, r"Invalid eps value: 0\.0"),
    (ADAMS, {"eps": -1e-8}, ValueError, r"Invalid eps value: -1e-08"),
    (ADAMS, {"betas": (1.0, 0.999)}, ValueError, r"Invalid betas\[0\] value: 1\.0"),
    (ADAMS, {"betas": (0.9, -0.1)}, ValueError, r"Invalid betas\[1\] value: -0\.1"),
    (ADAMS, {"betas": (0.9, 1.5)}, ValueError, r"Invalid betas\[1\] value: 1\.5"),
    (SGDS, {"momentum": -0.9}, ValueError, r"Invalid momentum value: -0\.9"),
    (SGDS, {"dampening": 1.5}, ValueError, r"Invalid dampening value: 1\.5"),
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


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_sparse_gradients_are_refused_at_step(cls):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = cls(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        optimizer.step()
