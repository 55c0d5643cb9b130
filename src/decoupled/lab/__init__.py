"""The lab: tasks, a training runner, a SQLite results store, compare and sweep.

``decoupled.lab.compare(model_fn, train_batches, evaluate, ...)`` runs the compare protocol
on your own model (see ``decoupled.lab.custom``).
"""

from decoupled.lab.custom import compare

__all__ = ["compare"]
