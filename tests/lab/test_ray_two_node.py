"""A sweep on a real two-node Ray cluster on this machine, whose worker node cannot see --out.

The head has no CPUs, so every task runs on the second node, which lives in its own mount
namespace (``unshare -m``) where the sweep's --out folder is hidden behind an empty read-only
tmpfs: a worker that opened ``results.db`` would fail its run, and a result written there
would never reach the driver's store. The second node's raylet is killed (``kill -9``)
mid-sweep and a fresh node started: Ray retries the tasks lost with it there, and the driver
records them. Then the driver is interrupted (SIGINT, as Ctrl-C sends): no claim is left
``running``, and a second invocation completes only what is missing, every cell ``done``
exactly once and the cells finished before untouched.

Needs root (or a user namespace) for ``unshare -m`` and ``mount``; skipped, saying so, where
that is not permitted. Every wait has a timeout, and every process started here is killed at
the end, found by its process group or by the temporary folders named on its command line.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from decoupled.lab.store import ResultStore
from tests.helpers import wait_for_finished_runs

pytestmark = pytest.mark.xdist_group("processes")  # one xdist worker runs them in turn

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a dependency of ray

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",  # recent Ray turns on token authentication for ray start
    "RAY_USAGE_STATS_ENABLED": "0",
    # the GCS takes a silent node for dead after 2 missed checks a second apart (default:
    # several seconds each), so that the lost task is retried soon
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "2",
}
SWEEP = [
    sys.executable,
    "-m",
    "decoupled",
    "sweep",
    "--task",
    "digits",
    "--budget",
    "150",
    "--no-progress",
    "--executor",
    "ray",
]


def unshare_permitted() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt && umount /mnt"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_lines(stream, lines: queue.Queue[str]) -> None:
    with stream:
        for line in stream:
            lines.put(line)


class Cluster:
    """The processes this test starts, killed at the end (and nothing else)."""

    def __init__(self) -> None:
        self.folders: list[str] = []
        self.groups: list[subprocess.Popen] = []

    def folder(self, prefix: str) -> str:
        # short, not under tmp_path: Ray's socket paths in it must fit in 107 bytes
        self.folders.append(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        return self.folders[-1]

    def start(self, command: list[str], timeout: float = 60.0) -> subprocess.Popen:
        """Start ``ray start ... --block`` in its own process group; return once it says
        the node is up."""
        process = subprocess.Popen(
            command,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.groups.append(process)
        lines: queue.Queue[str] = queue.Queue()
        # a thread reads the output, so that a wait on it can time out, and closes it at its
        # end (left open, it was collected in a later test, failing it with a ResourceWarning)
        threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
        said, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                said.append(lines.get(timeout=0.5))
                if "Ray runtime started" in said[-1]:
                    return process
            if process.poll() is not None and lines.empty():
                break
        raise AssertionError(f"node did not start within {timeout} s: {''.join(said)[-2000:]}")

    def processes_of(self, folder: str, name: str = "") -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if folder in cmdline and name in cmdline:
                found.append(process)
        return found

    def stop(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group.pid, signal.SIGKILL)
        for folder in self.folders:  # workers Ray started in sessions of their own
            for process in self.processes_of(folder):
                with contextlib.suppress(psutil.Error):
                    process.kill()
        for group in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                group.wait(timeout=10)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs Linux mount namespaces (unshare -m)"
)
def test_a_sweep_on_two_nodes_survives_a_killed_raylet_and_records_every_cell_once(tmp_path):
    if not unshare_permitted():
        pytest.skip("unshare -m with a tmpfs mount is not permitted here (needs root)")
    out = tmp_path / "runs"
    out.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster = Cluster()
    grid = ["--lr", "1e-3,1e-2", "--wd-adam", "0,1e-3", "--wd-adamw", "1e-2,1e-1,1"]  # 10 cells
    first = [*SWEEP, *grid, "--ray-address", address]
    node = [RAY, "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
    try:
        head_dir = cluster.folder("rh")
        cluster.start(
            [*node, "--head", "--port", str(port), "--num-cpus", "0", "--temp-dir", head_dir]
            + ["--include-dashboard", "false"]
        )
        # the head alone has no CPU for a run: refused in one line, nothing trained
        refused = subprocess.run(
            [*first, "--out", str(out)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [
            "decoupled sweep: error: argument --ray-address: the Ray cluster has no node with "
            "1 CPU for a run of 1 torch thread (CPUs per alive node: 0); start a node with "
            "CPUs (ray start --num-cpus N)"
        ]
        assert ResultStore(out / "results.db").records() == []

        def start_worker_node() -> str:
            folder = cluster.folder("rw")
            hidden = f'mount -t tmpfs -o ro tmpfs {out} && exec "$@"'
            cluster.start(
                ["unshare", "-m", "sh", "-c", hidden, "sh", *node, "--address", address]
                + ["--num-cpus", "1", "--resources", '{"worker_node": 1}', "--temp-dir", folder]
            )
            return folder

        first_node = start_worker_node()
        sweep = subprocess.Popen(
            [*first, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        db = out / "results.db"
        assert wait_for_finished_runs(db, minimum=2, timeout=120) >= 2
        (raylet,) = cluster.processes_of(first_node, "raylet")
        raylet.kill()
        store = ResultStore(db)
        in_flight = {r.key for r in store.records(status="running")}  # claimed by the driver
        assert in_flight, "the sweep ended before the raylet was killed"
        start_worker_node()
        # Ray retries the tasks lost with the node on the new one, and the driver records them
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not in_flight <= set(store.done_keys()):
            time.sleep(0.1)
        assert in_flight <= set(store.done_keys()), [(r.status, r.error) for r in store.records()]

        # Ctrl-C on the driver: the results in are kept, the tasks in flight cancelled and
        # their claims released; the next invocation runs the rest, each cell once
        sweep.send_signal(signal.SIGINT)
        try:
            _, stderr = sweep.communicate(timeout=60)
        finally:
            sweep.kill()
        assert sweep.returncode == 130, stderr.decode()
        assert stderr.decode().strip().endswith("interrupted")
        records = store.records()
        kept = {r.key: r.finished for r in records if r.status == "done"}
        assert len(kept) < 10 and not [r for r in records if r.status == "running"]
        assert all(r.error == "interrupted" for r in records if r.status == "failed")
        again = subprocess.run(
            [*first, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        records = store.records()
        assert len(records) == 10 and all(r.status == "done" for r in records)
        assert all(next(r for r in records if r.key == k).finished == t for k, t in kept.items())
        assert "slope log λ*/log lr" in (out / "report.md").read_text()
    finally:
        cluster.stop()
