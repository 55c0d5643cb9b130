"""The driver's side of a distributed sweep: claim, submit, record each outcome as it arrives.

The driver is the store's one writer. It claims a run in ``results.db`` just before
submitting it, so the claim (owner: the driver's process) says which runs are in flight;
tasks only train and return a :class:`~decoupled.lab.outcome.RunOutcome`, which
:func:`~decoupled.lab.outcome.record` writes. The loop is the same whatever runs the tasks:
``ray_executor.py`` gives it Ray, the tests give it a stand-in.

What survives what:

* a task that raises: its outcome is ``failed`` with the traceback; the next invocation
  claims the failed row again;
* a worker or node that dies: Ray retries the task (``max_retries``); a task still lost after
  that is recorded ``failed`` with Ray's reason;
* the driver killed: the runs in flight stay ``running`` with a dead owner, which the next
  invocation claims again (same host: the pid is gone; another host: no heartbeat for
  ``ResultStore.stale_after`` seconds); every recorded run is kept;
* Ctrl-C: the results already arrived are recorded, the other tasks cancelled and their
  claims released (``failed``, "interrupted"), then KeyboardInterrupt goes on.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Protocol

from decoupled.lab.outcome import RunOutcome, record
from decoupled.lab.store import ResultStore, config_key
from decoupled.lab.train import RunSpec

#: Seconds between the driver's heartbeats on the rows of its tasks in flight; far below
#: ``STALE_AFTER_S`` (600 s), after which a process on another host takes them for abandoned.
HEARTBEAT_EVERY_S = 30.0


class Tasks(Protocol):
    """Where the driver's tasks run (Ray, or a stand-in in the tests)."""

    def capacity(self) -> int:
        """How many tasks to keep in flight now (at least 1)."""

    def submit(self, spec: RunSpec, config: dict) -> Hashable:
        """Start training ``spec`` (``config``: the driver's :meth:`RunSpec.config`)."""

    def wait(self, handles: list[Hashable], timeout: float) -> list[Hashable]:
        """The handles among ``handles`` that have finished, waiting up to ``timeout`` s."""

    def outcome(self, handle: Hashable, key: str) -> RunOutcome:
        """The finished task's outcome; a ``failed`` one if the task itself was lost."""

    def cancel(self, handle: Hashable) -> None:
        """Stop the task; its outcome is never asked for."""


def drive(
    pending: Sequence[RunSpec],
    store: ResultStore,
    tasks: Tasks,
    counts: dict[str, int],
    bar,
    *,
    heartbeat_every: float = HEARTBEAT_EVERY_S,
) -> dict[str, int]:
    """Run ``pending`` through ``tasks`` and record every outcome in ``store``; adds one to
    ``counts[status]`` per spec (``skipped``: another process holds its claim)."""
    waiting = deque(pending)
    in_flight: dict[Hashable, str] = {}  # the run key of each task
    # Every key this driver asked to claim and has not recorded: a Ctrl-C that lands between
    # a claim and its submit, or inside a record, must still release the claim. A refused
    # claim stays in it too (the key may be a repeat of one in flight); releasing a key this
    # process does not hold changes nothing (mark_interrupted).
    claimed: set[str] = set()
    last_beat = time.monotonic()
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < max(1, tasks.capacity()):
                spec = waiting.popleft()
                config = spec.config()
                key = config_key(config)  # as spec.key(), without a second config()
                claimed.add(key)
                if not store.claim(key, config):
                    counts["skipped"] += 1
                    bar.update(1)
                    continue
                in_flight[tasks.submit(spec, config)] = key
            if not in_flight:
                continue
            for handle in tasks.wait(list(in_flight), timeout=heartbeat_every):
                key = in_flight.pop(handle)
                counts[record(store, tasks.outcome(handle, key))] += 1
                claimed.discard(key)
                bar.update(1)
            if in_flight and time.monotonic() - last_beat >= heartbeat_every:
                store.heartbeat_many(list(in_flight.values()))
                last_beat = time.monotonic()
    except BaseException:
        _stop(store, tasks, in_flight, claimed, counts, bar)
        raise
    return counts


def _stop(store, tasks, in_flight, claimed, counts, bar) -> None:
    """Record what has already arrived, cancel the rest and release every claim still held
    (``mark_interrupted`` changes only this process's running rows, so a key whose claim
    never happened or whose result was written is left as it is). A store that fails here
    (the disk, the reason to stop) leaves the claims to their dead owner, which the next
    invocation takes back."""
    with contextlib.suppress(Exception):
        for handle in tasks.wait(list(in_flight), timeout=0):
            key = in_flight.pop(handle)
            counts[record(store, tasks.outcome(handle, key))] += 1
            claimed.discard(key)
            bar.update(1)
    for handle in in_flight:
        tasks.cancel(handle)
    with contextlib.suppress(Exception):
        for key in claimed:
            store.mark_interrupted(key)
