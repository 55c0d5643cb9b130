"""One run's outcome as a value: train a cell into a :class:`RunOutcome`, record it in the store.

Training and recording are apart so that the process which trains need not be the one which
writes ``results.db``: a local pool worker does both (``executor.run_claimed``), while a Ray
task only trains and returns the outcome to the driver, the one writer of the store
(``ray_driver.py``). Either way :func:`record` is the one place an outcome becomes a row.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decoupled.diagnostics.table import DecayTable
from decoupled.lab.store import FINISHED, ResultStore, StoreUnavailable
from decoupled.lab.tasks import Task, TaskData, get_task
from decoupled.lab.train import RunSpec, run

# Per process: loaded tasks and data, keyed by task name and data dir (a Ray worker process
# runs many cells, as a pool worker does, and loads each task's data once).
_TASKS: dict[tuple[str, str | None], tuple[Task, TaskData]] = {}


def task_and_data(spec: RunSpec) -> tuple[Task, TaskData]:
    """The spec's task and its data, loaded once per process."""
    cache_key = (spec.task, spec.data_dir)
    if cache_key not in _TASKS:
        task = get_task(spec.task)
        _TASKS[cache_key] = (task, task.load(spec.data_dir))
    return _TASKS[cache_key]


def preload(task: Task, data: TaskData, data_dir: str | None = None) -> None:
    """Use this task object and data for runs of ``task.name`` in this process (e.g. a user's
    own task, which ``get_task`` does not know)."""
    _TASKS[(task.name, data_dir)] = (task, data)


@dataclass
class RunOutcome:
    """What training one spec produced, small enough to send between processes and hosts.

    ``status`` is ``done`` or ``diverged`` (with ``metrics`` and ``curves``) or ``failed``
    (with ``error``: the traceback, prefixed by the host it happened on). ``monitor``
    holds the decay monitor's table where a caller asked for one; it is stored under the
    run's key.
    """

    key: str
    status: str
    metrics: dict[str, Any] | None = None
    curves: dict[str, Any] | None = None
    error: str | None = None
    host: str = field(default_factory=socket.gethostname)
    monitor: DecayTable | None = None

    @classmethod
    def failure(cls, key: str, error_text: str) -> RunOutcome:
        """A failed outcome whose error names this host (where a cluster's run failed)."""
        host = socket.gethostname()
        return cls(key, "failed", error=f"on host {host}: {error_text}", host=host)


def train_cell(
    spec: RunSpec,
    *,
    task: Task | None = None,
    data: TaskData | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunOutcome:
    """Train ``spec`` (with ``task``/``data`` if given, else its own) and return its outcome.

    An exception of the run becomes a ``failed`` outcome holding its traceback; Ctrl-C
    (KeyboardInterrupt) and a failing store (StoreUnavailable, raised by a heartbeat in
    ``on_progress``) propagate, since they are not the run's fault.
    """
    key = spec.key()
    try:
        if task is None or data is None:
            task, data = task_and_data(spec)
        result = run(spec, task=task, data=data, on_progress=on_progress)
    except StoreUnavailable:
        raise
    except Exception:
        return RunOutcome.failure(key, traceback.format_exc())
    return RunOutcome(key, result.status, result.metrics(), result.curves)


def record(store: ResultStore, outcome: RunOutcome) -> str:
    """Write ``outcome`` into its claimed row of ``store``; returns the status it has there.

    A row finished meanwhile (by a process wrongly presumed dead) keeps its result: the
    status returned is then the stored one, so a count of outcomes counts each run once.
    """
    if outcome.status in FINISHED:
        recorded = store.finish(
            outcome.key, outcome.status, outcome.metrics, outcome.curves, outcome.monitor
        )
    else:
        error = outcome.error or "failed (no error text)"
        recorded = store.fail(outcome.key, error, outcome.monitor)
    if recorded:
        return outcome.status
    stored = store.get(outcome.key)
    return stored.status if stored is not None and stored.status in FINISHED else "skipped"
