"""Building and loading the C++ kernel (``_build.py``): a build killed half-way (its torch
``lock`` file left behind) must not make later processes wait forever. These tests replace
``cpp_extension.load`` by a stand-in that does what torch does with its lock file, so they
take milliseconds instead of a compile."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from decoupled.optim import _build

fcntl = pytest.importorskip("fcntl", reason="the OS lock needs fcntl (POSIX)")


def os_lock_is_held(folder: Path) -> bool:
    """Whether some open file holds the build folder's OS lock (flock locks belong to open
    files, so a second open in this process conflicts with the first)."""
    with open(folder / "decoupled.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_lock_file_left_by_a_killed_build_does_not_block_the_next_load(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("DECOUPLED_NO_KERNEL", raising=False)
    monkeypatch.setattr(_build, "_ops", _build._NOT_TRIED)
    name, folder = _build.build_folder()
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what a build killed by kill -9 leaves
    loaded = object()

    def load(name, sources, build_directory, **options):
        """torch's guard: a process that cannot create the lock file waits while it exists."""
        baton = FileBaton(str(Path(build_directory, "lock")))
        if not baton.try_acquire():
            raise AssertionError("torch would wait for the stale lock file forever")
        baton.release()
        assert os_lock_is_held(Path(build_directory))  # other processes wait meanwhile
        return loaded

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        assert _build.kernel_ops() is loaded
    assert not os_lock_is_held(folder)  # released after the load


def test_the_lock_file_of_a_build_in_progress_is_left_alone(tmp_path):
    """A process that finds the OS lock taken waits for it, and a live builder's lock file
    is gone by the time the lock is free: nothing is removed under a running build."""
    (tmp_path / "lock").touch()  # a live build's lock file
    entered = threading.Event()

    def second_process():
        with _build._exclusive(tmp_path):
            entered.set()

    with open(tmp_path / "decoupled.lock", "a") as builder:
        fcntl.flock(builder, fcntl.LOCK_EX)
        waiter = threading.Thread(target=second_process)
        waiter.start()
        time.sleep(0.3)
        assert not entered.is_set() and (tmp_path / "lock").exists()
        (tmp_path / "lock").unlink()  # the builder finishes: torch removes its lock file
        fcntl.flock(builder, fcntl.LOCK_UN)
    waiter.join(timeout=10)
    assert entered.is_set()


def test_a_file_system_without_flock_falls_back_to_torchs_guard(monkeypatch, tmp_path):
    """flock may fail with ENOSYS/ENOLCK (Lustre without -o flock, some NFS/FUSE mounts): the
    kernel still loads, guarded by torch's lock file alone, which is left alone."""
    import errno

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / "lock").touch()
    with pytest.warns(RuntimeWarning, match="no file lock"):
        with _build._exclusive(tmp_path):
            entered = True
    assert entered and (tmp_path / "lock").exists()
