"""Planning: the runs (RunSpecs) a compare or a sweep needs, checked before any is trained.

A compare trains each optimizer ("arm") over seeds 0..K-1 at the task's documented defaults
or the given settings; a sweep trains every optimizer × lr × λ × seed cell of a grid. The
same seed fixes the initial weights and the batch order, so arms and cells are paired by
seed. What the finished runs say is summarized in ``comparison.py`` and ``sweep.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from decoupled.lab.tasks import Task
from decoupled.lab.train import RunSpec
from decoupled.optim.registry import check_optimizer


def plan_compare(
    task: Task,
    optimizers: Sequence[str],
    seeds: int,
    steps: int,
    overrides: dict[str, dict[str, float]] | None = None,
    **common: Any,
) -> list[RunSpec]:
    """The runs of a comparison: for each optimizer (task defaults updated by ``overrides``,
    e.g. ``{"adamw": {"weight_decay": 0.05}}``) one run per seed."""
    overrides = overrides or {}
    specs = []
    for name in optimizers:
        check_optimizer(name)
        defaults = task.defaults[name]
        settings = {
            "lr": defaults.lr,
            "weight_decay": defaults.weight_decay,
            "momentum": defaults.momentum,
            **overrides.get(name, {}),
        }
        for seed in range(seeds):
            spec = RunSpec(
                task=task.name, optimizer=name, seed=seed, steps=steps, **settings, **common
            )
            spec.validate()
            specs.append(spec)
    return specs


def plan_sweep(
    task: Task,
    optimizers: Sequence[str],
    lrs: dict[str, list[float]],
    wds: dict[str, list[float]],
    seeds: int,
    steps: int,
    **common: Any,
) -> list[RunSpec]:
    """One run per optimizer × lr × λ × seed (SGD/SGDW keep the task's momentum)."""
    specs = []
    for name in optimizers:
        momentum = task.defaults[name].momentum
        for lr in lrs[name]:
            for wd in wds[name]:
                for seed in range(seeds):
                    spec = RunSpec(
                        task=task.name,
                        optimizer=name,
                        lr=lr,
                        weight_decay=wd,
                        seed=seed,
                        steps=steps,
                        momentum=momentum,
                        **common,
                    )
                    spec.validate()
                    specs.append(spec)
    return specs
