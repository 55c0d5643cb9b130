"""The lab: tasks, a training runner, a SQLite results store, compare and sweep.

``decoupled.lab.compare(model_fn, train_batches, evaluate, ...)`` runs the compare protocol
on your own model (see ``decoupled.lab.custom``).

One job per file, in the order a command uses them:

* ``tasks/`` — the tasks (data, model, loss, metric, default hyperparameters).
* ``plan.py`` — the runs a compare or a sweep needs (``grid.py``: a sweep's lr × λ grid).
* ``train.py`` — one run: RunSpec → RunResult; ``loop.py`` — the one training loop and lr
  schedule that the runner, ``inspection.py`` (monitored runs) and ``batched.py`` (many
  sweep cells at once) share.
* ``executor.py``, ``batched.py``, ``ray_executor.py`` — which runs execute where;
  ``store.py`` and ``experiments.py`` — what ran, in results.db.
* ``comparison.py`` and ``sweep.py`` — what a compare's or a sweep's runs say (summaries,
  printed tables); ``stats.py`` — the statistics behind them; ``power.py`` — what a number
  of seeds can detect; ``sequential.py`` — the confidence sequence of ``--seeds auto``;
  ``compare_options.py`` — a compare's extra pairs and sequential design, as stored.
* ``report.py`` — a report's sections; ``figures.py`` — its plots; ``render.py`` —
  Markdown and HTML; ``workflow.py`` — the commands, as functions.

Optimizers are named and described once, in ``decoupled.optim.registry``.
"""

from decoupled.lab.custom import compare

__all__ = ["compare"]
