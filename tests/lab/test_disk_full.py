"""A full disk under --out: one line, exit status 3, the finished runs kept, a resume works.

Each test mounts a small tmpfs inside its temporary folder (root only; skipped where mounting
is not permitted) and always unmounts it.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from decoupled.cli import EXIT_STORAGE, main
from decoupled.lab import executor, workflow
from decoupled.lab.store import ResultStore

pytestmark = pytest.mark.xdist_group("processes")  # one xdist worker runs them in turn

SWEEP = [
    "sweep",
    "--task",
    "digits",
    "--budget",
    "5",
    "--optimizers",
    "adamw",
    "--lr",
    "1e-3",
    "--wd-adamw",
    "0,1e-2",
    "--no-progress",
]


def _close_stores_under(folder) -> None:
    """The CLI keeps its stores open for the process; a mount cannot go while they are."""
    for path in [p for p in executor._STORES if p.startswith(str(folder))]:
        executor._STORES.pop(path).close()


@pytest.fixture
def small_disk(tmp_path):
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on a POSIX system")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        _close_stores_under(disk)
        subprocess.run(["umount", str(disk)], check=False)
        if os.path.ismount(disk):  # a process still holds a file: detach it anyway
            subprocess.run(["umount", "-l", str(disk)], check=False)
        assert not os.path.ismount(disk)


def fill(disk) -> None:
    """Write a file on ``disk`` until no byte is left (unbuffered: nothing is left to flush)."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_creating_the_store_on_a_full_disk_is_one_line_and_leaves_no_empty_file(small_disk, capsys):
    fill(small_disk)
    out = small_disk / "runs"
    out.mkdir()
    assert main([*SWEEP, "--out", str(out)]) == EXIT_STORAGE
    line = one_line(capsys)
    assert line.startswith("decoupled sweep: error:") and "full" in line, line
    assert sorted(p.name for p in out.iterdir()) == []  # no 0-byte results.db


def test_a_disk_full_during_the_runs_keeps_them_and_the_sweep_resumes(
    small_disk, capfd, monkeypatch
):
    """capfd: the pool workers' stderr counts too (an idle worker stopped by the parent once
    printed a KeyboardInterrupt traceback there)."""
    out = small_disk / "runs"
    real_execute = workflow.execute

    def fill_then_execute(*args, **kwargs):  # after the store is made, before any claim
        fill(small_disk)
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(workflow, "execute", fill_then_execute)
    assert main([*SWEEP, "--workers", "2", "--out", str(out)]) == EXIT_STORAGE
    line = one_line(capfd)
    assert "is full" in line and "run the command again to resume" in line, line

    monkeypatch.setattr(workflow, "execute", real_execute)
    (small_disk / "filler").unlink()
    assert main([*SWEEP, "--workers", "2", "--out", str(out)]) == 0
    _close_stores_under(small_disk)
    with ResultStore(out / "results.db", create=False) as store:
        assert [record.status for record in store.records()] == ["done", "done"]


COMPARE = ["compare", "--task", "digits", "--budget", "5", "--optimizers", "adamw"]


@pytest.mark.parametrize(
    "command, table",
    [(SWEEP, "best test error"), ([*COMPARE, "--seeds", "2", "--no-progress"], "weight_decay")],
    ids=["sweep", "compare"],
)
def test_a_disk_full_when_writing_plots_prints_the_table_then_one_line(
    small_disk, capsys, monkeypatch, command, table
):
    out = small_disk / "runs"
    real_write = workflow.write_reports

    def fill_then_write(*args, **kwargs):  # every run is stored; the plots do not fit
        fill(small_disk)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(workflow, "write_reports", fill_then_write)
    assert main([*command, "--workers", "1", "--out", str(out)]) == EXIT_STORAGE
    captured = capsys.readouterr()
    assert table in captured.out  # the results table came first
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"decoupled {command[0]}: error:"), lines
    assert "No space left on device" in lines[0] and "kept" in lines[0], lines
    _close_stores_under(small_disk)
    with ResultStore(out / "results.db", create=False) as store:
        assert [record.status for record in store.records()] == ["done", "done"]
