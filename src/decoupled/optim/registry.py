"""The optimizers the lab knows, one entry each: what every table, plot, runner and command
line reads about an optimizer (in the spirit of timm's ``OptimInfo`` and torch's ``optim_db``).

Adding a variant is one :class:`OptimizerInfo` in :data:`REGISTRY` plus its class (or, for
a switch of an existing class such as cautious weight decay, the class with that switch on). Colours
are matplotlib colour strings (plain data: nothing here imports a plotting library); the
pairs red/blue and orange/green are matplotlib's "tab10" colours, so each L2 optimizer and
its decoupled twin are told apart at a glance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

from decoupled.optim.adam import Adam, AdamW
from decoupled.optim.sgd import SGD, SGDW


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer as the lab uses it.

    ``decay`` is ``"L2"`` (λθ added to the gradient, before any scaling) or ``"decoupled"``
    (θ ← θ − γλθ apart from the gradient step; Loshchilov & Hutter 2019). ``family`` names
    the functional core (``adam_update`` or ``sgd_update``) the batched executor calls, and
    ``defaults`` the hyperparameters the lab never varies, passed to that core as they are
    (they equal the class's own defaults, so a batched cell and a separate run agree).
    ``untuned`` are common starting values: Adam's lr 1e-3 with λ 1e-4 as L2 or torch's
    AdamW default 1e-2; SGD's lr 0.01, momentum 0.9 and L2 5e-4, and SGDW's λ 5e-3, SGD's
    × 1/(1 − μ): the decay L2 reaches through the momentum buffer.

    ``variant_of`` names the optimizer whose tuned hyperparameters a variant takes (tasks'
    defaults, :func:`with_variant_defaults`): cautious weight decay adds no hyperparameter
    (Chen, Li, Liang et al., arXiv 2510.12402, use AdamW's λ unchanged), so ``adamw-cautious``
    runs at AdamW's lr and λ and ``sgdw-cautious`` at SGDW's.
    """

    name: str  # the lab's key: "adamw"
    cls: Callable[..., torch.optim.Optimizer]  # a class, or one with a switch set (partial)
    decay: str  # "L2" | "decoupled"
    family: str  # "adam" | "sgd"
    label: str  # "AdamW"
    color: str  # matplotlib colour of its curves and points
    dark_color: str  # a darker shade of ``color`` (median lines drawn over its boxes)
    torch_twin: type[torch.optim.Optimizer] | None  # the torch.optim class with its algorithm
    twin: str  # the optimizer with the same update and the other kind of decay
    momentum: bool = False  # takes ``momentum`` (SGD's heavy ball)
    state_dtype: bool = False  # keeps moments that may be compact (``state_dtype=bfloat16``)
    batched: bool = True  # the batched executor can train it (lab/batched.py)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # lr, weight_decay (and momentum) for a model without tuned values (the lab's
    # bring-your-own-model compare); λ in the class's own units
    untuned: Mapping[str, float] = field(default_factory=dict)
    variant_of: str | None = None  # whose tuned lr and λ it takes (cautious: AdamW's, SGDW's)

    @property
    def decoupled(self) -> bool:
        return self.decay == "decoupled"

    @property
    def takes_decay_scale(self) -> bool:
        """Whether it takes ``decay_scale`` (only decoupled decay has a convention to pick)."""
        return self.decoupled

    @property
    def described(self) -> str:
        """The label with its decay when that is L2 ("Adam + L2"); a decoupled optimizer's
        name already says it ("AdamW")."""
        return f"{self.label} + L2" if self.decay == "L2" else self.label


_ADAM_DEFAULTS = MappingProxyType({"beta1": 0.9, "beta2": 0.999, "eps": 1e-8})
_SGD_DEFAULTS = MappingProxyType({"dampening": 0.0, "nesterov": False})
_CAUTIOUS = MappingProxyType({"cautious": True})

REGISTRY: Mapping[str, OptimizerInfo] = MappingProxyType(
    {
        info.name: info
        for info in (
            OptimizerInfo(
                "adam", Adam, "L2", "adam", "Adam", "#d62728", "#7a1112", torch.optim.Adam,
                twin="adamw", state_dtype=True, defaults=_ADAM_DEFAULTS,
                untuned={"lr": 1e-3, "weight_decay": 1e-4},
            ),
            OptimizerInfo(
                "adamw", AdamW, "decoupled", "adam", "AdamW", "#1f77b4", "#0b3a5c",
                torch.optim.AdamW, twin="adam", state_dtype=True, defaults=_ADAM_DEFAULTS,
                untuned={"lr": 1e-3, "weight_decay": 1e-2},
            ),
            OptimizerInfo(
                "sgd", SGD, "L2", "sgd", "SGD", "#ff7f0e", "#8a4500", torch.optim.SGD,
                twin="sgdw", momentum=True, defaults=_SGD_DEFAULTS,
                untuned={"lr": 1e-2, "weight_decay": 5e-4, "momentum": 0.9},
            ),
            # torch has no SGD with decoupled decay
            OptimizerInfo(
                "sgdw", SGDW, "decoupled", "sgd", "SGDW", "#2ca02c", "#145214", None,
                twin="sgd", momentum=True, defaults=_SGD_DEFAULTS,
                untuned={"lr": 1e-2, "weight_decay": 5e-3, "momentum": 0.9},
            ),
            # cautious weight decay (arXiv 2510.12402): AdamW's and SGDW's update with the decay
            # masked; torch has neither; batched=False: the batched executor is not tested on it
            OptimizerInfo(
                "adamw-cautious", partial(AdamW, cautious=True), "decoupled", "adam",
                "AdamW + CWD", "#17becf", "#0b5f68", None, twin="adam", state_dtype=True,
                batched=False, defaults=_ADAM_DEFAULTS | _CAUTIOUS,
                untuned={"lr": 1e-3, "weight_decay": 1e-2}, variant_of="adamw",
            ),
            OptimizerInfo(
                "sgdw-cautious", partial(SGDW, cautious=True), "decoupled", "sgd", "SGDW + CWD",
                "#bcbd22", "#5e5e11", None, twin="sgd", momentum=True, batched=False,
                defaults=_SGD_DEFAULTS | _CAUTIOUS,
                untuned={"lr": 1e-2, "weight_decay": 5e-3, "momentum": 0.9}, variant_of="sgdw",
            ),
        )
    }
)  # fmt: skip

#: the optimizers' names, in the registry's order
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The entry of ``name``; ``ValueError: Invalid optimizer value: 'adan' (choose from
    adam, adamw, sgd, sgdw, adamw-cautious, sgdw-cautious)`` for an unknown one."""
    check_optimizer(name)
    return REGISTRY[name]


def check_optimizer(name: object) -> None:
    """Raise the one error for an optimizer name the registry does not hold."""
    if name not in REGISTRY:
        raise ValueError(f"Invalid optimizer value: {name!r} (choose from {', '.join(REGISTRY)})")


def with_variant_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A task's tuned hyperparameters per optimizer name, completed with each variant's: the
    values of the optimizer it is a variant of (``OptimizerInfo.variant_of``), unless the task
    tuned the variant itself."""
    completed = dict(defaults)
    for info in REGISTRY.values():
        if info.variant_of in defaults and info.name not in defaults:
            completed[info.name] = defaults[info.variant_of]
    return completed


def pairs() -> Iterator[tuple[str, str]]:
    """Each L2 optimizer with its decoupled twin, in the registry's order: the pairs a
    comparison reports."""
    for info in REGISTRY.values():
        if info.decay == "L2" and info.twin in REGISTRY:
            yield info.name, info.twin


#: matplotlib colour per optimizer name
COLORS: Mapping[str, str] = MappingProxyType({n: i.color for n, i in REGISTRY.items()})
DARK_COLORS: Mapping[str, str] = MappingProxyType({n: i.dark_color for n, i in REGISTRY.items()})
