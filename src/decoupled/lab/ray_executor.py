"""Run a sweep's cells as Ray tasks, for grids that outgrow one machine.

Each cell is one Ray task running :func:`decoupled.lab.executor.run_into_store`: the same
claim-run-record protocol as the local executor, so runs are done exactly once and a stopped
sweep resumes. The results store is an SQLite file, so every node must see the same ``--out``
path (a shared filesystem); on one machine that holds by itself. Ray is an optional extra:
``pip install "decoupled[ray]"``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from decoupled.lab.executor import pending_runs, progress_bar, run_into_store
from decoupled.lab.store import ResultStore
from decoupled.lab.train import RunSpec


class RayUnavailable(RuntimeError):
    """Ray could not start or reach the cluster at the given address."""


def execute_on_ray(
    specs: Sequence[RunSpec],
    db_path: str | Path,
    *,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Run the missing specs on Ray (``address``: ``"auto"``, ``"ray://host:port"``, or None
    to start a local instance); returns counts per status. Each task asks Ray for
    ``spec.threads`` CPUs and runs with that many torch threads."""
    import ray

    db_path = str(Path(db_path).resolve())
    pending, counts = pending_runs(specs, ResultStore(db_path))
    if not pending:
        return counts
    started_here = not ray.is_initialized()
    if started_here:
        # The package must be importable by the workers: ship this interpreter's path.
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        try:
            ray.init(
                address=address,
                runtime_env=env,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayUnavailable(f"cannot start or reach Ray at {address!r}: {error}") from None
    remote = ray.remote(run_into_store)
    try:
        refs = [remote.options(num_cpus=spec.threads).remote(spec, db_path) for spec in pending]
        bar = progress_bar(len(specs), counts["cached"], "ray sweep", progress)
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            counts[ray.get(ready[0])] += 1
            bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
    return counts
