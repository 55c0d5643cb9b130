"""Run a sweep's cells as Ray tasks, for grids that outgrow one machine.

Each cell is one Ray task (:func:`train_on_worker`) that trains and *returns* its outcome;
the driver, the process running ``decoupled sweep``, is the only one that opens
``results.db`` and records each outcome as it arrives (``ray_driver.py``). So the store
needs no shared filesystem: ``--out`` is on the driver's machine only, SQLite is used by
processes of one host as its WAL mode requires (https://sqlite.org/wal.html), and a
stopped sweep started again runs only what is not stored.

Failures: Ray retries a task whose worker process or node dies (``max_retries``, 3); a task
that raises, or that Ray lost after its retries, is recorded ``failed`` with its traceback
and run again by the next invocation; Ctrl-C cancels the tasks in flight
(``ray.cancel``) and releases their claims.

What a node needs: ``decoupled`` and the same torch as the driver (the driver ships its
``sys.path`` as ``PYTHONPATH``, enough on one machine), and the task's data, generated or
bundled, or under a ``--data-dir`` at the same path on every node. A worker checks both
before training: a missing folder, or a configuration that differs from the one the driver
keyed (package version, step path, data identity), fails the run with a message naming the
host, rather than storing another computation under the driver's key. Ray is an optional
extra: ``pip install "decoupled[ray]"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from decoupled.lab.executor import open_store, pending_runs, progress_bar
from decoupled.lab.outcome import RunOutcome, train_cell
from decoupled.lab.ray_driver import drive
from decoupled.lab.store import config_key
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


def train_on_worker(spec: RunSpec, driver_config: dict) -> RunOutcome:
    """A Ray task: train ``spec`` on this node and return its outcome (it never opens the
    store). The run fails, naming this host, when ``--data-dir`` is missing here or when
    this node would train something else than the driver keyed (another step path, package
    version or data identity), instead of storing it under the driver's key."""
    key = config_key(driver_config)
    problem = data_dir_problem(spec) or config_problem(spec, driver_config)
    if problem is not None:
        return RunOutcome.failure(key, problem)
    return train_cell(spec)


def data_dir_problem(spec: RunSpec) -> str | None:
    """Why ``spec.data_dir`` cannot be read on this host (None: it is a folder here)."""
    if spec.data_dir is None or Path(spec.data_dir).is_dir():
        return None
    return (
        f"--data-dir {spec.data_dir!r} is not a folder on host {socket.gethostname()}: "
        "with the ray executor it must exist at that path on every node"
    )


def config_problem(spec: RunSpec, driver_config: dict) -> str | None:
    """The fields of the run's configuration that differ between the driver and this host."""
    here = spec.config()
    differing = sorted(
        k for k in here.keys() | driver_config.keys() if here.get(k) != driver_config.get(k)
    )
    if not differing:
        return None
    details = "; ".join(
        f"{name}: {driver_config.get(name)!r} on the driver, {here.get(name)!r} here"
        for name in differing
    )
    return (
        f"host {socket.gethostname()} would not train the run the driver planned ({details}); "
        "install the same decoupled, torch and data on every node"
    )


def check_cluster(nodes: Sequence[Mapping], threads: int) -> None:
    """Raise RayUnavailable unless an alive node of ``nodes`` (``ray.nodes()``) has
    ``threads`` CPUs for one run; the message names the resources the cluster has."""
    alive = [node for node in nodes if node.get("Alive", node.get("alive", False))]
    cpus = [float(node.get("Resources", {}).get("CPU", 0)) for node in alive]
    if any(count >= threads for count in cpus):
        return
    described = ", ".join(f"{count:g}" for count in cpus) or "none alive"
    raise RayUnavailable(
        f"the Ray cluster has no node with {threads} CPU{'s' * (threads != 1)} for a run of "
        f"{threads} torch thread{'s' * (threads != 1)} (CPUs per alive node: {described}); "
        "start a node with CPUs (ray start --num-cpus N)"
    )


class _RayTasks:
    """The driver's tasks as Ray tasks (see ``ray_driver.Tasks``)."""

    def __init__(self, ray, threads: int, max_retries: int) -> None:
        self.ray, self.threads = ray, threads
        self.remote = ray.remote(train_on_worker)
        self.max_retries = max_retries
        self._capacity, self._asked = 1, -math.inf

    def capacity(self) -> int:
        # Twice the runs the cluster's CPUs hold at once, so that no CPU waits for the
        # driver between two runs; asked again now and then, as nodes come and go.
        if time.monotonic() - self._asked > CAPACITY_EVERY_S:
            cpus = self.ray.cluster_resources().get("CPU", 0)
            self._capacity = max(1, 2 * int(cpus // self.threads))
            self._asked = time.monotonic()
        return self._capacity

    def submit(self, spec: RunSpec, config: dict):
        options = {"num_cpus": spec.threads, "max_retries": self.max_retries}
        # a task that raises returns a failed outcome instead; a retry would only repeat it
        return self.remote.options(**options, retry_exceptions=False).remote(spec, config)

    def wait(self, handles: list, timeout: float) -> list:
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:  # and every other one finished meanwhile, without waiting
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def outcome(self, handle, key: str) -> RunOutcome:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as error:
            # last: the error itself, whose last line is what a summary of failures shows
            lost = (
                f"the Ray task returned no result ({type(error).__name__}; Ray retries a task "
                f"whose worker process or node dies, up to {self.max_retries} times); it is "
                f"run again next time:\n{error}"
            )
            return RunOutcome(key, "failed", error=lost, host="?")

    def cancel(self, handle) -> None:
        with contextlib.suppress(Exception):
            self.ray.cancel(handle, force=True)


#: Seconds between two looks at the cluster's CPUs (how many tasks to keep in flight).
CAPACITY_EVERY_S = 5.0
#: Ray's retries of a task whose worker process or node died (Ray's own default too).
MAX_RETRIES = 3


def execute_on_ray(
    specs: Sequence[RunSpec],
    db_path: str | Path,
    *,
    address: str | None = None,
    progress: bool = True,
    max_retries: int = MAX_RETRIES,
) -> dict[str, int]:
    """Run the missing specs on Ray (``address``: ``"auto"``, ``"host:port"``,
    ``"ray://host:port"``, or None to start a local instance); returns counts per status.

    This process is the store's one writer (``ray_driver.drive``); each task asks Ray for
    ``spec.threads`` CPUs, runs with that many torch threads and returns its outcome.
    Raises RayUnavailable when Ray cannot start, the address cannot be reached, or no node
    has the CPUs a run asks for.
    """
    import ray

    store = open_store(db_path)
    pending, counts = pending_runs(specs, store)
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
                logging_level=logging.WARNING,  # the command's output is its own
                ignore_reinit_error=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayUnavailable(
                f"cannot start or reach Ray at {address!r}: {_one_line(error)}"
            ) from None
    try:
        threads = max(spec.threads for spec in pending)
        check_cluster(ray.nodes(), threads)
        bar = progress_bar(len(specs), counts["cached"], "ray sweep", progress)
        try:
            drive(pending, store, _RayTasks(ray, threads, max_retries), counts, bar)
        finally:
            bar.close()
    finally:
        if started_here:
            ray.shutdown()
    return counts
