"""The contract between a task and the lab (AlgoPerf's "workload" idea, kept small).

A task owns its data, its model and its metric; the runner owns the optimizer, the loop, the
seeds and the budget. The runner calls, in order::

    data = task.load(data_dir)                 # once per process; tensors on the CPU
    torch.manual_seed(seed); model = task.build_model()
    for batch in task.batches(data, generator):   # infinite, order fixed by `generator`
        loss = task.loss(model, batch)
    metric = task.evaluate(model, data)         # lower is better unless higher_is_better

Everything a task declares (budgets, batch size, default hyperparameters per optimizer) is
data on the class, so reports and `decoupled suggest` can read it without running anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decoupled.optim.registry import with_variant_defaults


@dataclass(frozen=True)
class Hyperparameters:
    """Default optimizer settings of a task: lr γ and weight decay λ (torch's "lr" units)."""

    lr: float
    weight_decay: float
    momentum: float = 0.0  # SGD/SGDW only


@dataclass
class TaskData:
    """A task's loaded data: named CPU tensors, plus how many training examples there are."""

    tensors: dict[str, Tensor]
    train_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def to(self, device: torch.device | str) -> TaskData:
        """A copy with every tensor on ``device`` (the runner moves data to CUDA once)."""
        tensors = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return TaskData(tensors, self.train_size, dict(self.info))


class Task:
    """Base class for lab tasks. Subclasses set the class attributes and the five methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]  # e.g. "test_error", "val_bits_per_byte"
    higher_is_better: ClassVar[bool] = False
    batch_size: ClassVar[int]
    steps: ClassVar[int]  # default budget, in optimizer steps
    quick_steps: ClassVar[int]  # smoke-test budget (`--quick`)
    eval_every: ClassVar[int]  # steps between evaluations on the held-out set
    defaults: ClassVar[dict[str, Hyperparameters]]  # per optimizer name: adam, adamw, sgd, sgdw
    needs_data_dir: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults" in cls.__dict__:  # variants (adamw-cautious) take their base's tuning
            cls.defaults = with_variant_defaults(cls.defaults)

    def load(self, data_dir: str | None = None) -> TaskData:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        raise NotImplementedError

    def data_identity(self, data_dir: str | None = None) -> str | None:
        """What identifies this task's data beyond the code and the package versions, or
        None: it goes into every run's store key, so that results on other data (files
        replaced behind the same ``--data-dir``, another interpreter's standard library)
        are never reused as if they were these."""
        return None


def shuffled_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless epochs of shuffled index batches over ``n`` examples: none repeats within an
    epoch, and the last partial batch of an epoch is dropped."""
    if n < batch_size:
        raise ValueError(f"Invalid batch_size value: {batch_size} (only {n} training examples)")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def shuffled_batches(
    inputs: Tensor, targets: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless epochs of shuffled mini-batches (:func:`shuffled_indices`)."""
    for index in shuffled_indices(inputs.shape[0], batch_size, generator):
        yield inputs[index], targets[index]


@torch.no_grad()
def classification_error(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024
) -> float:
    """Share of misclassified examples (the paper's "test error"), evaluated in eval mode."""
    was_training = model.training
    model.eval()
    wrong = 0
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start : start + batch_size])
        wrong += (logits.argmax(-1) != targets[start : start + batch_size]).sum().item()
    model.train(was_training)
    return wrong / inputs.shape[0]


class ClassificationTask(Task):
    """A task whose data are ``x_train, y_train, x_test, y_test`` tensors: shuffled batches,
    cross-entropy loss, test error. Image tasks set the class attributes and the model."""

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[Any]:
        return shuffled_batches(data["x_train"], data["y_train"], self.batch_size, generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        return classification_error(model, data["x_test"], data["y_test"])
