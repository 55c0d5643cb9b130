"""Lab tasks, registered by name. `get_task("mnist1d")` returns a fresh task object."""

from __future__ import annotations

from decoupled.lab.tasks.base import Hyperparameters, Task, TaskData

DEFAULT_TASK = "mnist1d"

# name -> "module:Class"; imported lazily so that a task's optional dependencies
# (scikit-learn, mnist1d, the MiniLM package) are needed only when that task is used.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


register("mnist1d", "decoupled.lab.tasks.mnist1d:MNIST1D")
register("digits", "decoupled.lab.tasks.digits:Digits")
register("vit", "decoupled.lab.tasks.vit:ViT")
register("charlm", "decoupled.lab.tasks.charlm:CharLM")
register("cifar10", "decoupled.lab.tasks.cifar10:CIFAR10")
register("minilm", "decoupled.lab.tasks.minilm:MiniLM")


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"Invalid task value: {name!r} (choose from {', '.join(task_names())})")
    module_name, class_name = _REGISTRY[name].split(":")
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)()


__all__ = [
    "DEFAULT_TASK",
    "Hyperparameters",
    "Task",
    "TaskData",
    "get_task",
    "register",
    "task_names",
]
