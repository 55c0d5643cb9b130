"""The training half of `decoupled inspect`: Adam + L2, AdamW and AdamW with cautious weight
decay (AdamW + CWD, arXiv 2510.12402) trained side by side with a
:class:`~decoupled.diagnostics.monitor.DecayMonitor` attached.

All runs use the task's default hyperparameters for each optimizer, the same seed (same
initial weights) and the same batches, through the lab's own optimizer builder, schedule
and loop (``train.py``, ``loop.py``): biases and normalization layers are not decayed, the
lr follows a cosine decay to 0. What the monitor measured is compared in
``decoupled.diagnostics.inspection``.
"""

from __future__ import annotations

import time

import torch

from decoupled.diagnostics.inspection import InspectedRun, element_samples
from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.lab.loop import ModelStep, build_scheduler, run_loop
from decoupled.lab.tasks import Task, TaskData
from decoupled.lab.train import RunSpec, build_optimizer, torch_threads


def train_monitored(
    task: Task, data: TaskData, spec: RunSpec, *, every: int, sample_at: int | None = None
) -> InspectedRun:
    """Train ``spec`` on the CPU with ``spec.threads`` torch threads and a monitor; sample
    per-element rates at ``sample_at`` (default: mid-run). A non-finite loss raises
    FloatingPointError naming the optimizer, the loss and the step."""
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = task.build_model()
    optimizer = build_optimizer(spec, model)
    scheduler = build_scheduler(spec, optimizer)
    batches = task.batches(data, torch.Generator().manual_seed(spec.seed))
    sample_at = sample_at or max(1, spec.steps // 2)
    elements: dict = {}
    model.train()
    # the spec's thread count, as the lab's runner uses: the same numbers on every machine
    with torch_threads(spec.threads), DecayMonitor(optimizer, model, every=every) as monitor:

        def sample(step: int, loss) -> None:
            nonlocal elements
            if step == sample_at:  # the rates at the lr this step used
                elements = element_samples(optimizer, monitor.names)

        take_step = ModelStep(task, model, optimizer, scheduler, batches, after_update=sample)
        diverged_at = run_loop(spec.steps, spec.steps, take_step)
        if diverged_at is not None:
            raise FloatingPointError(
                f"{spec.optimizer}: loss is {take_step.loss.item()} at step {diverged_at}"
            )
    metric = task.evaluate(model, data)
    return InspectedRun(
        spec, monitor.table, metric, task.metric, time.perf_counter() - started, elements, sample_at
    )


def inspect_task(
    task: Task,
    data: TaskData,
    *,
    steps: int,
    seed: int = 0,
    every: int = 10,
    optimizers: tuple[str, ...] = ("adam", "adamw", "adamw-cautious"),
) -> list[InspectedRun]:
    """Monitored runs of each optimizer with the task's defaults (same seed, same batches)."""
    runs = []
    for name in optimizers:
        if name not in task.defaults:
            raise ValueError(f"task {task.name} has no default hyperparameters for {name}")
        hyper = task.defaults[name]
        spec = RunSpec(
            task=task.name,
            optimizer=name,
            lr=hyper.lr,
            weight_decay=hyper.weight_decay,
            seed=seed,
            steps=steps,
            momentum=hyper.momentum,
        )
        runs.append(train_monitored(task, data, spec, every=every))
    return runs
