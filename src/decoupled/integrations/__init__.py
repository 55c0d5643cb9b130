"""Integrations: the decay diagnostics where training is watched (TensorBoard, and every logger
of Hugging Face's Trainer and of Lightning). This layer sits beside the lab: it imports the
optimizers and the diagnostics, never the command line.

* ``scalars`` — the monitor's rows as named scalars (``decay/<layer>/angular_update``, ...):
  the one naming scheme.
* ``tensorboard`` — :class:`TensorBoardDecayLogger` for a plain loop, and :func:`read_scalars`
  (event files back, through TensorBoard's ``EventAccumulator``).
* ``huggingface`` — ``DecayMonitorCallback`` for ``transformers.Trainer`` (``hf`` extra).
* ``lightning`` — ``DecayMonitorCallback`` for Lightning's Trainer (``lightning`` extra).
* ``figure`` — the inspect panels redrawn from a TensorBoard logdir (matplotlib).

``huggingface`` and ``lightning`` import their framework, so they are imported by name, not
from here.
"""

from decoupled.integrations.scalars import decay_scalars
from decoupled.integrations.tensorboard import TensorBoardDecayLogger, read_scalars

__all__ = ["TensorBoardDecayLogger", "decay_scalars", "read_scalars"]
