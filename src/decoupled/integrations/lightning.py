"""The decay diagnostics as a PyTorch Lightning ``Callback``.

    trainer = lightning.Trainer(logger=TensorBoardLogger("runs"),
                                callbacks=[DecayMonitorCallback(every_n_steps=50)])

When training starts the callback attaches a :class:`DecayMonitor` to the trainer's first
optimizer; after each recorded optimizer step it writes that step's scalars (``scalars.py``)
to every logger of the trainer (``logger.log_metrics(scalars, step=trainer.global_step)``:
TensorBoard, CSV, W&B, MLflow, ...). The loggers are called directly rather than through
``LightningModule.log`` so that the Trainer's ``log_every_n_steps`` does not thin out the
callback's own ``every_n_steps``. Needs the ``lightning`` extra.

Lightning steps the optimizer with a closure that computes the gradients inside ``step()``,
after torch's step pre-hooks have run; at the very first step no gradient exists yet when the
monitor's pre-hook runs, so it keeps every tensor and records those that have a gradient after
the step: step 1 is recorded like every other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.integrations.scalars import (
    DEFAULT_EVERY_N_STEPS,
    NewSteps,
    attach_monitor,
    check_every_n_steps,
)


class DecayMonitorCallback(Callback):
    """Logs weight-decay diagnostics every ``every_n_steps`` optimizer steps to the trainer's
    loggers. ``monitor`` (set when training starts) keeps the full table."""

    def __init__(self, every_n_steps: int = DEFAULT_EVERY_N_STEPS) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.monitor: DecayMonitor | None = None
        self._new_steps: NewSteps | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise RuntimeError("DecayMonitorCallback found no optimizer on the trainer")
        optimizer = trainer.optimizers[0]
        self.monitor = attach_monitor(optimizer, pl_module, self.every_n_steps, type(self).__name__)
        self._new_steps = NewSteps(self.monitor)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._new_steps is None:
            return
        for _, scalars in self._new_steps:
            if scalars:
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.remove()
