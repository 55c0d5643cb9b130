"""Bring your own model: the compare protocol on user code.

    from decoupled.lab import compare
    result = compare(model_fn, train_batches, evaluate, steps=500, seeds=3)

``model_fn()`` builds a fresh model (called after ``torch.manual_seed(seed)``),
``train_batches(seed)`` returns training batches in an order fixed by ``seed`` (the same
for every optimizer): an endless generator, or a re-iterable such as a ``DataLoader``, which
is iterated again, epoch after epoch, until the run has its steps. ``evaluate(model)``
returns the metric. Runs go into the same store
and report as the built-in tasks; they are keyed by ``name`` and the settings, not by your
code — use a new ``name`` (or ``out``) when you change the model or data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decoupled.lab import executor
from decoupled.lab.comparison import Comparison
from decoupled.lab.tasks.base import Hyperparameters, Task, TaskData
from decoupled.optim.registry import REGISTRY


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def epochs(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches, then the batches again (the next epoch), without end. A one-shot iterator
    cannot start again, so its end, or an epoch without batches, is an error that says so."""
    while True:
        count = 0
        for count, batch in enumerate(batches, 1):  # noqa: B007 (count is read below)
            yield batch
        if count == 0 or iter(batches) is batches:
            raise ValueError(
                f"train_batches(seed) ran out after {count} batches in an epoch: return an "
                "endless generator or a re-iterable (e.g. a DataLoader) that yields batches"
            )


class CustomTask(Task):
    """A Task made of user callables (see the module docstring)."""

    def __init__(
        self,
        name: str,
        model_fn: Callable[[], nn.Module],
        train_batches: Callable[[int], Iterable[Any]],
        evaluate: Callable[[nn.Module], float],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        metric: str,
        higher_is_better: bool,
        steps: int,
        eval_every: int,
        defaults: dict[str, Hyperparameters],
    ) -> None:
        self.name = name
        self.description = f"Custom task {name!r} (user model and data)"
        self.metric, self.higher_is_better = metric, higher_is_better
        self.steps = self.quick_steps = steps
        self.eval_every, self.batch_size, self.defaults = eval_every, 0, defaults
        self._model_fn, self._train_batches = model_fn, train_batches
        self._evaluate, self._loss_fn = evaluate, loss_fn

    def load(self, data_dir: str | None = None) -> TaskData:
        return TaskData({}, train_size=0)

    def build_model(self) -> nn.Module:
        return self._model_fn()

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[Any]:
        return epochs(self._train_batches(generator.initial_seed()))

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self._loss_fn(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        was_training = model.training
        model.eval()
        try:
            return float(self._evaluate(model))
        finally:
            model.train(was_training)


def compare(
    model_fn: Callable[[], nn.Module],
    train_batches: Callable[[int], Iterable[Any]],
    evaluate: Callable[[nn.Module], float],
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] = cross_entropy_loss,
    settings: dict[str, dict[str, float]] | None = None,
    optimizers: tuple[str, ...] = ("adam", "adamw"),
    seeds: int = 5,
    steps: int = 1000,
    eval_every: int | None = None,
    metric: str = "metric",
    higher_is_better: bool = False,
    name: str = "custom",
    out: str | Path = "./decoupled-runs",
    progress: bool = True,
    **common: Any,
) -> Comparison:
    """Run the compare protocol on your own model; returns the :class:`Comparison` (print it
    with ``decoupled.lab.comparison.format_table``) and writes the report into ``out``.

    ``settings`` gives each optimizer's ``lr``/``weight_decay``/``momentum``; missing ones
    default to the registry's ``untuned`` values (``decoupled.optim.registry``): lr 1e-3
    with λ 1e-4 (Adam's L2) or 1e-2 (AdamW, torch's default), and for SGD/SGDW lr 0.01 and
    momentum 0.9, with λ 5e-4 for SGD's L2 and 5e-3 for SGDW (SGD's × 1/(1 − μ), the decay
    that L2 reaches through the momentum buffer, as in the built-in tasks). ``metric`` names
    what ``evaluate`` returns (a name ending in ``error`` is shown in percent). Runs execute
    in this process.
    """
    from decoupled.lab.workflow import compare_task, prepare_out_dir

    base = {name: Hyperparameters(**info.untuned) for name, info in REGISTRY.items()}
    task_name = f"custom:{name}"
    task = CustomTask(
        task_name,
        model_fn,
        train_batches,
        evaluate,
        loss_fn,
        metric,
        higher_is_better,
        steps,
        eval_every or max(1, steps // 20),
        base,
    )
    out_dir = prepare_out_dir(out)
    executor.preload(task, task.load())  # the runs execute in this process
    return compare_task(
        task,
        optimizers=list(optimizers),
        seeds=seeds,
        steps=steps,
        out=out_dir,
        overrides=settings,
        workers=1,
        progress=progress,
        name=f"compare-{name}",
        **common,
    )
