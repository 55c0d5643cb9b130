"""A plain training loop's decay diagnostics in TensorBoard, and the event files read back.

    writer = SummaryWriter("runs/adamw")
    with TensorBoardDecayLogger(optimizer, model, writer, every_n_steps=50):
        for batch in batches:
            ...; loss.backward(); optimizer.step()   # every 50th step is written

Tags follow ``scalars.py`` (``decay/<layer>/angular_update``, ``decay_model/lr``, ...), at the
monitor's step (optimizer steps since attaching). Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.integrations.scalars import (
    DEFAULT_EVERY_N_STEPS,
    NewSteps,
    attach_monitor,
    check_every_n_steps,
)


class TensorBoardDecayLogger:
    """Attaches a :class:`DecayMonitor` to ``optimizer`` and writes each recorded step's
    scalars to ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``, or anything with its
    ``add_scalar(tag, value, step)``) right after that optimizer step.

    ``monitor`` keeps the full table (``monitor.table``); ``remove()`` (or leaving a ``with``
    block) detaches both hooks and flushes the writer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        writer,
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
    ) -> None:
        check_every_n_steps(every_n_steps)
        self.writer = writer
        self.monitor: DecayMonitor = attach_monitor(
            optimizer, model, every_n_steps, type(self).__name__
        )
        self._new_steps = NewSteps(self.monitor)
        # registered after the monitor's own post-hook, so it runs after the measurement
        self._handle = self.monitor.optimizer.register_step_post_hook(self._write)

    def _write(self, optimizer, args, kwargs) -> None:
        for step, scalars in self._new_steps:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def remove(self) -> None:
        self._handle.remove()
        self.monitor.remove()
        self.writer.flush()

    def __enter__(self) -> TensorBoardDecayLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def read_scalars(logdir: str | Path, prefix: str = "") -> dict[str, dict[int, float]]:
    """Every scalar under ``logdir`` (all event files below it, merged): tag -> {step: value},
    read with TensorBoard's own ``EventAccumulator``. ``prefix`` (e.g. ``"train/"``, which
    Hugging Face's callback adds) is stripped from the tags that have it; others are dropped.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:  # an optional extra
        raise ImportError(
            "reading TensorBoard event files needs the tensorboard extra: "
            'pip install "decoupled[tensorboard]"'
        ) from error
    logdir = Path(logdir)
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep all
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if not tag.startswith(prefix):
                continue
            values = scalars.setdefault(tag[len(prefix) :], {})
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars
