"""Run many RunSpecs into the results store: only missing runs execute, each exactly once.

Each run is claimed in the store before it starts, so several processes (or several
invocations of `decoupled compare`) can share one store; a run left ``running`` by a dead
process is claimed again. Ctrl-C keeps every finished run; the interrupted ones are marked
and redone next time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from decoupled.lab.outcome import preload, record, train_cell
from decoupled.lab.outcome import task_and_data as _task_and_data  # noqa: F401 (batched.py)
from decoupled.lab.store import FINISHED, ResultStore
from decoupled.lab.tasks import Task, TaskData
from decoupled.lab.train import RunSpec
from decoupled.optim import kernel_available

__all__ = ["execute", "open_store", "pending_runs", "preload", "run_claimed", "run_into_store"]

# Per process: open stores (the loaded tasks and data are cached in outcome.py).
_STORES: dict[str, ResultStore] = {}


def open_store(path: str | Path, *, create: bool = True) -> ResultStore:
    """This process's store at ``path``, opened once and kept open: closing a connection
    while other processes use the file is where SQLite's WAL bookkeeping is most fragile.
    ``create=False`` refuses a missing or empty file instead of making it a store."""
    path = str(path)
    if path not in _STORES:
        _STORES[path] = ResultStore(path, create=create)
    return _STORES[path]


def run_into_store(spec: RunSpec, db_path: str) -> str:
    """Claim, run and record one spec; returns its final status (or "skipped")."""
    if _STOPPING.is_set():  # an interrupted pool worker takes no queued run
        return "skipped"
    _WORKING.set()
    store = open_store(db_path)
    try:
        if not store.claim(spec.key(), spec.config()):
            return "skipped"
        return run_claimed(spec, store)
    except KeyboardInterrupt:  # also between the claim and the run; another's row is left
        store.mark_interrupted(spec.key())
        raise
    finally:
        _WORKING.clear()


def run_claimed(
    spec: RunSpec, store: ResultStore, task: Task | None = None, data: TaskData | None = None
) -> str:
    """Run a spec this process has claimed in ``store`` and record its outcome; returns its
    status. ``task`` and ``data`` default to the spec's own (loaded once per process)."""
    key = spec.key()
    try:
        # a heartbeat at every evaluation: a process on another host sees the run is alive
        outcome = train_cell(
            spec, task=task, data=data, on_progress=lambda *_: store.heartbeat(key)
        )
        return record(store, outcome)
    except KeyboardInterrupt:  # also inside record: a row already written is left as it is
        store.mark_interrupted(key)
        raise


def pending_runs(specs: Sequence[RunSpec], store: ResultStore) -> tuple[list[RunSpec], dict]:
    """The specs not yet finished in the store, and a fresh count per outcome (``cached``:
    already finished)."""
    done = store.done_keys()
    pending = [spec for spec in specs if spec.key() not in done]
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": 0}
    counts["cached"] = len(specs) - len(pending)
    return pending, counts


# Set in a pool worker at its first Ctrl-C: it finishes marking its run and takes no other.
_STOPPING = threading.Event()
# Set while a pool worker claims or runs a spec (an idle one waits for the pool's next item).
_WORKING = threading.Event()


def _stop_taking_runs(signum: int, frame: object) -> None:
    if not _STOPPING.is_set():  # a second signal must not interrupt the marking of the first
        _STOPPING.set()
        # An idle worker has no run to mark, and an interrupt inside the pool's queue read
        # would print a traceback on stderr; it exits when the pool shuts down.
        if _WORKING.is_set():
            raise KeyboardInterrupt


def _init_worker(parent: int) -> None:
    """In each pool worker: on Ctrl-C, mark the run in progress as interrupted and take no
    queued run after it; exit when the parent dies (``kill -9`` leaves no one to shut the
    pool down, and an orphan would go on claiming runs)."""
    signal.signal(signal.SIGINT, _stop_taking_runs)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # its claimed run stays "running" with a dead owner: redone next time

    threading.Thread(target=exit_with_parent, daemon=True).start()


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def execute(
    specs: Sequence[RunSpec],
    db_path: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    description: str = "runs",
) -> dict[str, int]:
    """Run every spec whose result is not yet in the store; returns counts per status.

    ``workers`` processes (default: one per core) run at once, each run with its own
    ``spec.threads`` torch threads; ``workers=1`` runs in this process.
    """
    db_path = str(db_path)
    pending, counts = pending_runs(specs, open_store(db_path))
    workers = max(1, min(workers or default_workers(), len(pending) or 1))
    bar = progress_bar(len(specs), counts["cached"], description, progress)
    try:
        if workers == 1:
            for spec in pending:
                counts[run_into_store(spec, db_path)] += 1
                bar.update(1)
        else:
            _execute_in_pool(pending, db_path, workers, counts, bar)
    finally:
        bar.close()
    return counts


def _execute_in_pool(pending, db_path, workers, counts, bar) -> None:
    if not torch.cuda.is_available():
        kernel_available()  # built (or found) once here, so the workers only load it
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    )
    futures: set[Future] = set()
    spec_of: dict[Future, RunSpec] = {}
    try:
        spec_of = {pool.submit(run_into_store, spec, db_path): spec for spec in pending}
        futures = set(spec_of)
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                counts[future.result()] += 1
                bar.update(1)
                del spec_of[future]
    except BrokenProcessPool:  # a worker died (kill -9, out of memory, a crash)
        pool.shutdown(wait=True, cancel_futures=True)
        _after_a_worker_died(list(spec_of.values()), db_path, workers, counts, bar)
        return
    except BaseException:
        for future in futures:
            future.cancel()
        # Ctrl-C in a terminal reaches the workers too; `kill -INT <parent>` does not
        for process in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


WORKER_DIED = (
    "its worker process died while running it (killed, out of memory or crashed; the pool "
    "then stops every worker, so a run beside it is marked too); it is retried next time"
)


def _after_a_worker_died(unfinished, db_path, workers, counts, bar) -> None:
    """The pool is broken: the runs its workers held are marked failed (their owners are
    gone), those finished meanwhile are counted, and the rest run in a new pool. A run that
    kills its worker every time fails each time, instead of aborting the whole command."""
    store, rest = open_store(db_path), []
    for spec in unfinished:
        key = spec.key()
        record = store.get(key)
        if store.fail_abandoned(key, WORKER_DIED):
            counts["failed"] += 1
            bar.update(1)
        elif record is not None and record.status in FINISHED:
            counts[record.status] += 1
            bar.update(1)
        else:
            rest.append(spec)
    if rest:
        _execute_in_pool(rest, db_path, min(workers, len(rest)), counts, bar)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="run",
        file=sys.stderr,
        dynamic_ncols=True,
    )
