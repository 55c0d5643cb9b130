"""Run a sweep's cells as Ray tasks, for grids that outgrow one machine.

Each cell is one Ray task running :func:`decoupled.lab.executor.run_into_store`: the same
claim-run-record protocol as the local executor, so runs are done exactly once and a stopped
sweep resumes. The results store is an SQLite file, so every node must see the same ``--out``
path (a shared filesystem); on one machine that holds by itself. Ray is an optional extra:
``pip install "decoupled[ray]"``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from decoupled.lab.executor import pending_runs, progress_bar, run_into_store
from decoupled.lab.store import ResultStore
from decoupled.lab.train import RunSpec


class RayUnavailable(RuntimeError):
    """Ray could not start or reach the cluster at the given address."""


#: Seconds to wait for a TCP answer from the address; a Ray head on a reachable network
#: answers in milliseconds, and a sweep's refusal should not hang on a wrong one.
CONNECT_TIMEOUT = 3.0


def check_address(address: str | None, timeout: float | None = None) -> None:
    """Raise RayUnavailable (one line) unless Ray can use ``address``, without starting Ray.

    Forms, as ``ray.init`` reads them: None or ``"local"`` start a local instance (nothing to
    reach); ``"auto"`` is ``RAY_ADDRESS``, else the cluster that ``ray start`` recorded, found
    with Ray's own lookup; ``"host:port"`` is a cluster's GCS; ``"ray://host:port"`` is a Ray
    Client server, which also needs the ``ray[client]`` extra (grpcio). The host must accept a
    TCP connection on the port within ``timeout`` seconds (default CONNECT_TIMEOUT).
    """
    if address is None or address == "local":
        return
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    target = address
    if address == "auto":
        from_environment = os.environ.get("RAY_ADDRESS", "")
        if from_environment not in ("", "auto"):  # ray.init reads it before anything else
            return check_address(from_environment, timeout)
        target = _recorded_cluster()
        if target is None:  # a Ray without the lookup: ray.init finds it or says why
            return
    host, port = _host_and_port(address, target.removeprefix("ray://"))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        raise RayUnavailable(
            f"{address!r}: no answer from {host}:{port} within {timeout:g} s"
        ) from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayUnavailable(f"{address!r}: cannot connect to {host}:{port} ({reason})") from None
    if target.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise RayUnavailable(
            f"{address!r} needs the Ray client (grpcio): pip install 'decoupled[ray]'"
        )


def _host_and_port(address: str, target: str) -> tuple[str, int]:
    host, colon, port = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # IPv6: [::1]:6379
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536) or "/" in target:
        raise RayUnavailable(
            f"{address!r} is not a Ray address (use auto, host:port or ray://host:port)"
        )
    return host, int(port)


def _recorded_cluster() -> str | None:
    """host:port of the cluster ``"auto"`` means; RayUnavailable when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (OSError, RuntimeError, ValueError) as error:
        raise RayUnavailable(f"'auto': {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


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
            raise RayUnavailable(
                f"cannot start or reach Ray at {address!r}: {_one_line(error)}"
            ) from None
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
