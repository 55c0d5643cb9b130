"""The decay diagnostics as a Hugging Face ``transformers.TrainerCallback``.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(decoupled.AdamW, {"lr": 1e-3}))
    trainer.add_callback(DecayMonitorCallback(trainer, every_n_steps=50))
    trainer.train()

At the start of training the callback attaches a :class:`DecayMonitor` to the optimizer the
Trainer built (through accelerate's wrapper); after each recorded optimizer step it passes
that step's scalars (``scalars.py``) to ``Trainer.log``, which hands them to every reporting
callback the ``report_to`` argument turned on (TensorBoard, W&B, MLflow, ...) and to
``trainer.state.log_history``. The callback needs the trainer because a ``TrainerCallback`` is
not given it, and only ``Trainer.log`` reaches all the reporters. Needs the ``hf`` extra.
"""

from __future__ import annotations

from transformers import TrainerCallback

from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.integrations.scalars import (
    DEFAULT_EVERY_N_STEPS,
    NewSteps,
    attach_monitor,
    check_every_n_steps,
)


class DecayMonitorCallback(TrainerCallback):
    """Logs weight-decay diagnostics every ``every_n_steps`` optimizer steps through
    ``trainer.log``. ``monitor`` (set when training starts) keeps the full table."""

    def __init__(self, trainer, every_n_steps: int = DEFAULT_EVERY_N_STEPS) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.trainer = trainer
        self.monitor: DecayMonitor | None = None
        self._new_steps: NewSteps | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.monitor = attach_monitor(optimizer, model, self.every_n_steps, type(self).__name__)
        self._new_steps = NewSteps(self.monitor)

    def on_step_end(self, args, state, control, **kwargs):
        if self._new_steps is None:
            return
        for _, scalars in self._new_steps:  # logged at the Trainer's global step
            if scalars:
                self.trainer.log(dict(scalars))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.remove()
