"""The optimizer test database (after torch's ``optim_db``): each optimizer once, with its torch
twin, its input rows and what it supports, and the implementation paths as a second axis.

Tests parametrize over ``entries × paths`` (:func:`cases`); a new path (a Triton kernel, int8
state) is tested everywhere it applies by adding one :class:`Path` row to ``PATHS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import decoupled
from tests.helpers import OptimizerInput


@dataclass(frozen=True)
class Path:
    """One implementation path, as an optimizer is told to take it.

    ``kwargs`` select it at construction; ``hide_kernel`` runs it as on a machine without the
    C++ kernel; ``needs`` are the capabilities (``OptimizerInfo.supports``) it requires;
    ``logged`` is the update function ``path_log`` records for a family ("adam", "sgd");
    ``dtypes`` are the parameter dtypes on which it is compared with the reference loop
    (empty: not compared there, e.g. the reference itself); ``takes`` says which input rows
    it computes (others would step elsewhere); ``exact_twin``: bit-identical to torch's
    single-tensor loop (``foreach=False``)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    hide_kernel: bool = False
    needs: frozenset = frozenset()
    logged: Callable[[str], str] = lambda family: f"{family}_update"
    dtypes: tuple = ()
    takes: Callable[[OptimizerInfo, OptimizerInput], bool] = lambda info, inp: True
    exact_twin: bool = False

    def __repr__(self) -> str:
        return self.name


def _torch_fused_takes(info: OptimizerInfo, inp: OptimizerInput) -> bool:
    """torch's fused kernels decay toward zero only, and take AdamW's rate c = lr·λ as a
    number (not with a tensor lr)."""
    tensor_rate = info.cls is decoupled.AdamW and torch.is_tensor(inp.kwargs.get("lr"))
    cautious = inp.kwargs.get("cautious", False)  # torch's kernels have no mask
    return "decay_to" not in inp.kwargs and not tensor_rate and not cautious


PATHS = [
    Path("reference", {"fused": False}, exact_twin=True),
    Path(
        "kernel",
        needs=frozenset({"kernel"}),
        logged=lambda family: f"kernel_{family}_update",
        dtypes=(torch.float32,),
    ),
    Path(
        "torch-fused",
        hide_kernel=True,
        needs=frozenset({"torch_fused"}),
        logged=lambda family: "fused_adam_update",
        dtypes=(torch.float32, torch.float64),
        takes=_torch_fused_takes,
    ),
    Path(
        "compact",
        {"state_dtype": torch.bfloat16},
        needs=frozenset({"kernel", "compact_state"}),
        logged=lambda family: f"kernel_{family}_update",
    ),
]
PATH = {path.name: path for path in PATHS}


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer: its class and torch twin (None: torch has none), its family, the rows
    shared with torch (``inputs``, compared exactly), the rows for the fast paths
    (``fast_inputs``, some with options torch lacks), the rows its sparse-gradient path takes,
    the kwargs of the state tests, and what it supports."""

    cls: type
    torch_cls: type | None
    family: str
    inputs: list[OptimizerInput]
    fast_inputs: list[OptimizerInput]
    supports: frozenset
    state_kwargs: dict = field(default_factory=dict)
    sparse_inputs: list[OptimizerInput] = field(default_factory=list)

    def __repr__(self) -> str:
        return self.cls.__name__

    @property
    def paths(self) -> list[Path]:
        return [path for path in PATHS if path.needs <= self.supports]


ADAM_INPUTS = [
    OptimizerInput({}, "defaults"),
    OptimizerInput({"lr": 3e-2}, "large lr"),
    OptimizerInput({"weight_decay": 0.1}, "weight decay"),
    OptimizerInput({"weight_decay": 0.1, "amsgrad": True}, "amsgrad + decay"),
    OptimizerInput({"betas": (0.5, 0.9), "eps": 1e-4}, "betas and eps"),
    OptimizerInput({"betas": (0.0, 0.99)}, "no first moment"),
    OptimizerInput({"weight_decay": 0.05, "maximize": True}, "maximize"),
    OptimizerInput({"lr": torch.tensor(0.01), "weight_decay": 0.2}, "tensor lr"),
    OptimizerInput({"weight_decay": 0.0}, "no decay"),
]
SGD_INPUTS = [
    OptimizerInput({"lr": 0.05}, "plain"),
    OptimizerInput({"lr": 0.05, "weight_decay": 0.1}, "weight decay"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9}, "momentum"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}, "damp"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, "nag"),
    OptimizerInput({"lr": 0.01, "momentum": 0.5, "maximize": True, "weight_decay": 0.1}, "max"),
    OptimizerInput({"lr": torch.tensor(0.05), "momentum": 0.9}, "tensor lr"),
]
# Sparse gradients take no L2 term (it is dense): the rows without one, and a few more.
SPARSE_INPUTS = [inp for inp in SGD_INPUTS if not inp.kwargs.get("weight_decay")] + [
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "dampening": 0.5}, "damp"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "nesterov": True}, "nag"),
    OptimizerInput({"lr": 0.01, "momentum": 0.5, "maximize": True}, "max"),
]

ADAM_FAST_INPUTS = [
    OptimizerInput({"weight_decay": 0.1}, "decay"),
    OptimizerInput({"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
    OptimizerInput({"weight_decay": 0.05, "maximize": True}, "maximize"),
    OptimizerInput({"betas": (0.3, 0.9), "eps": 1e-3}, "small beta1"),  # lerp's other branch
    OptimizerInput({"lr": torch.tensor(0.01), "weight_decay": 0.2}, "tensor lr"),
    OptimizerInput({"weight_decay": lambda step: 0.1 / step**0.5}, "decay schedule"),
    OptimizerInput({"weight_decay": 0.3, "decay_to": "init"}, "decay to init"),
    OptimizerInput({"weight_decay": 0.0}, "no decay"),
]
ADAMW_FAST_INPUTS = ADAM_FAST_INPUTS + [
    OptimizerInput({"weight_decay": 0.5, "decay_scale": "schedule"}, "schedule"),
    OptimizerInput({"weight_decay": 1e-4, "decay_scale": "constant"}, "constant"),
    OptimizerInput({"weight_decay": 0.5, "decay_scale": "corrected"}, "corrected"),
    OptimizerInput({"weight_decay": 0.5, "decay_to": "init", "decay_scale": "constant"}, "c>0.5"),
    # cautious weight decay (arXiv 2510.12402): large λ so that the mask moves θ visibly
    OptimizerInput({"weight_decay": 2.0, "cautious": True}, "cautious"),
    OptimizerInput(
        {"weight_decay": 2.0, "cautious": True, "decay_to": "init", "amsgrad": True},
        "cautious to init",
    ),
    OptimizerInput(
        {"weight_decay": 20.0, "cautious": True, "maximize": True, "decay_scale": "schedule"},
        "cautious maximize",
    ),
]
SGD_FAST_INPUTS = [
    OptimizerInput({"lr": 0.05, "weight_decay": 0.1}, "plain"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}, "momentum"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}, "damp"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, "nag"),
    OptimizerInput({"lr": 0.01, "momentum": 0.5, "maximize": True, "weight_decay": 0.1}, "max"),
    OptimizerInput({"lr": 0.05, "momentum": 0.9, "weight_decay": 0.2, "decay_to": "init"}, "init"),
    OptimizerInput({"lr": torch.tensor(0.05), "momentum": 0.9, "weight_decay": 0.1}, "tensor lr"),
]
SGDW_FAST_INPUTS = SGD_FAST_INPUTS + [
    OptimizerInput(
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.5, "decay_scale": "schedule"}, "schedule"
    ),
    OptimizerInput(
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "decay_scale": "constant"}, "constant"
    ),
    OptimizerInput({"lr": 0.05, "weight_decay": 0.5, "cautious": True}, "cautious"),
    OptimizerInput(
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.5, "cautious": True}, "cautious momentum"
    ),
    OptimizerInput(
        {
            "lr": 0.05,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 0.5,
            "cautious": True,
            "decay_to": "init",
            "maximize": True,
        },
        "cautious nesterov init",
    ),  # fmt: skip
]

_ADAM_SUPPORTS = frozenset({"kernel", "torch_fused", "compact_state", "amsgrad", "complex"})
_SGD_SUPPORTS = frozenset({"kernel", "sparse"})

OPTIM_DB = [
    OptimizerInfo(
        decoupled.Adam,
        torch.optim.Adam,
        "adam",
        ADAM_INPUTS,
        ADAM_FAST_INPUTS,
        _ADAM_SUPPORTS,
        state_kwargs={"lr": 0.01, "weight_decay": 0.1},
    ),
    OptimizerInfo(
        decoupled.AdamW,
        torch.optim.AdamW,
        "adam",
        ADAM_INPUTS,
        ADAMW_FAST_INPUTS,
        _ADAM_SUPPORTS,
        state_kwargs={"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    ),
    OptimizerInfo(
        decoupled.SGD,
        torch.optim.SGD,
        "sgd",
        SGD_INPUTS,
        SGD_FAST_INPUTS,
        _SGD_SUPPORTS,
        state_kwargs={"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        sparse_inputs=SPARSE_INPUTS,
    ),
    OptimizerInfo(decoupled.SGDW, None, "sgd", [], SGDW_FAST_INPUTS, _SGD_SUPPORTS),
]
INFO = {info.cls: info for info in OPTIM_DB}


def cases(
    *,
    inputs: str | None = None,
    paths: Callable[[Path], bool] = lambda path: True,
    entries: Callable[[OptimizerInfo], bool] = lambda info: True,
    dtypes: bool = False,
) -> list:
    """``pytest.param(info, path[, inp][, dtype])`` for every entry × its paths (× its rows
    named by ``inputs`` that the path takes) (× the path's ``dtypes``), filtered."""
    params = []
    for info in filter(entries, OPTIM_DB):
        for path in filter(paths, info.paths):
            rows = getattr(info, inputs) if inputs else [None]
            for inp in rows:
                if inp is not None and not path.takes(info, inp):
                    continue
                for dtype in path.dtypes if dtypes else [None]:
                    values = [info, path] + ([inp] if inputs else []) + ([dtype] if dtypes else [])
                    name = "-".join(
                        [repr(info), path.name]
                        + ([inp.desc] if inputs else [])
                        + ([str(dtype).removeprefix("torch.")] if dtypes else [])
                    )
                    params.append(pytest.param(*values, id=name))
    return params
