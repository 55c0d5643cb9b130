"""The training loop every runner of the lab shares, and the lr schedule it follows.

:func:`run_loop` counts the steps and calls the evaluations; what a step does comes from its
caller. :class:`ModelStep` is the step of one model (the runner in ``train.py`` and the
monitored runs of ``inspection.py``); the batched executor (``batched.py``) passes its own
vmapped step for many cells at once. A step is, in this order: the loss of the next batch
(a non-finite loss ends the run before it is used), zero the gradients, backward, the
optimizer's update, the ``after_update`` hook (still at the lr the update used), then the
scheduler moves the lr on. Every runner taking this one path is what keeps their numbers
alike: the same operations in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from decoupled.lab.tasks import Task
from decoupled.schedules import WarmupCosine

SCHEDULES = ("cosine", "constant")


def build_scheduler(spec, optimizer: torch.optim.Optimizer):
    """The lr schedule of a spec (``schedule``, ``warmup_steps``, ``steps``): a linear
    warm-up then cosine decay to 0 (:class:`decoupled.schedules.WarmupCosine`), or the
    warm-up then a constant lr; None for a constant lr without warm-up."""
    if spec.schedule == "constant" and spec.warmup_steps == 0:
        return None
    if spec.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: min(1.0, t / spec.warmup_steps)
        )
    return WarmupCosine(optimizer, spec.warmup_steps, spec.steps)


def schedule_factors(spec) -> list[float]:
    """The lr multiplier of every step, read off :func:`build_scheduler` at base lr 1 (for a
    runner that applies the lr itself, as the batched executor does)."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(replace(spec, lr=1.0), dummy)
    factors = []
    for _ in range(spec.steps):
        factors.append(float(dummy.param_groups[0]["lr"]))
        dummy.step()
        if scheduler is not None:
            scheduler.step()
    return factors


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Every tensor in a batch (a tensor, or tuples, named tuples, lists and dicts of them)
    moved to ``device``; anything else is left as it is. ``None``: the batch as it is."""
    if device is None:
        return batch
    return tree_map_only(Tensor, lambda t: t.to(device, non_blocking=True), batch)


def evaluation_due(step: int, steps: int, eval_every: int) -> bool:
    """Evaluations fall every ``eval_every`` steps and after the last step."""
    return step % eval_every == 0 or step == steps


def run_loop(
    steps: int,
    eval_every: int,
    take_step: Callable[[int], bool],
    on_evaluation: Callable[[int], None] | None = None,
) -> int | None:
    """Call ``take_step(step)`` for steps 1..``steps`` and ``on_evaluation(step)`` when one is
    due (:func:`evaluation_due`). A step that returns False ends the loop: the run diverged
    there, and that step is returned; None when every step was taken."""
    for step in range(1, steps + 1):
        if not take_step(step):
            return step
        if on_evaluation is not None and evaluation_due(step, steps, eval_every):
            on_evaluation(step)
    return None


class ModelStep:
    """One optimizer step of one model (the order in the module docstring), for
    :func:`run_loop`. After a step, ``loss`` is its loss and ``lr`` the first group's lr its
    update used; ``after_update(step, loss)`` runs before the scheduler moves the lr on."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        batches: Iterator[Any],
        device: torch.device | None = None,
        after_update: Callable[[int, Tensor], None] | None = None,
    ) -> None:
        self.task, self.model, self.optimizer, self.scheduler = task, model, optimizer, scheduler
        self.batches, self.device, self.after_update = batches, device, after_update
        self.loss: Tensor | None = None
        self.lr = float("nan")

    def __call__(self, step: int) -> bool:
        loss = self.task.loss(self.model, to_device(next(self.batches), self.device))
        self.loss = loss
        if not torch.isfinite(loss):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.after_update is not None:
            self.after_update(step, loss)
        if self.scheduler is not None:
            self.scheduler.step()
        return True


class MeanLoss:
    """The mean training loss since it was last taken (an ``after_update`` hook)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, step: int, loss: Tensor) -> None:
        self.total, self.count = self.total + loss.item(), self.count + 1

    def take(self) -> float:
        mean = self.total / self.count
        self.total, self.count = 0.0, 0
        return mean


def new_curves() -> dict[str, list[float]]:
    """A run's curves, aligned on ``"step"``: the mean training loss since the previous
    evaluation, the task's metric, and the lr of the evaluation step's update."""
    return {"step": [], "train_loss": [], "metric": [], "lr": []}


def add_point(
    curves: dict[str, list[float]], step: int, train_loss: float, metric: float, lr: float
) -> None:
    curves["step"].append(step)
    curves["train_loss"].append(train_loss)
    curves["metric"].append(metric)
    curves["lr"].append(lr)
