"""Building and loading the C++ kernel (``_build.py``): a build killed half-way (its torch
``lock`` file left behind) must not make later processes wait forever. These tests replace
``cpp_extension.load`` by a stand-in that does what torch does with its lock file, so they
take milliseconds instead of a compile."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
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


# -- a read-only kernel cache --------------------------------------------------------------
# Tests run as root, which ignores permission bits, so a read-only cache is either a real
# read-only bind mount (in a private mount namespace, when the OS permits one) or a file
# system whose every write fails with EROFS at the OS call (``os.open``, ``os.mkdir``).

READ_ONLY = OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.fixture
def prebuilt_cache(tmp_path):
    """A cache folder holding a copy of this session's built kernel (built once, reused)."""
    if _build.kernel_ops() is None:
        pytest.skip("no C++ kernel on this machine")
    name, folder = _build.build_folder()
    copy = tmp_path / "cache" / folder.name
    copy.mkdir(parents=True)
    shutil.copy2(folder / f"{name}.so", copy / f"{name}.so")
    return tmp_path / "cache"


@pytest.fixture
def read_only_os(monkeypatch, tmp_path):
    """Every write below ``tmp_path`` fails with EROFS, as on a read-only mount."""
    real_open, real_mkdir = os.open, os.mkdir

    def fake_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and str(path).startswith(str(tmp_path)):
            raise READ_ONLY
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and not Path(path).is_dir():
            raise READ_ONLY
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(cpp_extension, "load", lambda **_: pytest.fail("tried to build"))
    monkeypatch.setattr(_build, "_ops", _build._NOT_TRIED)
    monkeypatch.delenv("DECOUPLED_NO_KERNEL", raising=False)


def test_a_prebuilt_kernel_loads_from_a_read_only_cache(
    prebuilt_cache, read_only_os, monkeypatch, recwarn
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(prebuilt_cache))
    ops = _build.kernel_ops()
    assert ops is not None and hasattr(ops, "adam_step_") and hasattr(ops, "sgd_step_")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_read_only_cache_without_a_kernel_says_so(read_only_os, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    _, folder = _build.build_folder()
    expected = (
        rf"kernel was not built: the kernel cache {re.escape(str(folder))} is not writable "
        r"\(Read-only file system\) and holds no prebuilt kernel"
    )
    with pytest.warns(RuntimeWarning, match=expected):
        assert _build.kernel_ops() is None


_READ_ONLY_SCRIPT = """
import os, sys, warnings
import torch
from decoupled.optim import _build
warnings.simplefilter("error", RuntimeWarning)
assert _build.kernel_ops() is not None, "prebuilt kernel not loaded"
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
assert _build.kernel_ops().adam_step_([p], [p.grad], [torch.zeros(3)], [torch.zeros(3)], [], [],
    [torch.tensor(0.0)], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, False, False, False, 1.0, False, False, 0)
assert p.lt(1).all()
_build._ops = _build._NOT_TRIED
os.environ["TORCH_EXTENSIONS_DIR"] = sys.argv[1] + "/empty"
warnings.simplefilter("default", RuntimeWarning)
with warnings.catch_warnings(record=True) as caught:
    assert _build.kernel_ops() is None
assert "not writable (Read-only file system)" in str(caught[0].message), caught[0].message
print("read-only cache ok")
"""


def test_a_real_read_only_mount(prebuilt_cache):
    """The same on a read-only bind mount, in a private mount namespace (``unshare``)."""
    root = prebuilt_cache.parent
    (root / "empty").mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mount = f"mount --bind {root} {root} && mount -o remount,ro,bind {root} {root}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private read-only mount here: {probe.stderr.decode().strip()}")
    command = f'{mount} && exec "$0" -c "$1" "$2"'
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(prebuilt_cache)}
    env.pop("DECOUPLED_NO_KERNEL", None)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, sys.executable, _READ_ONLY_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "read-only cache ok" in result.stdout


# -- DECOUPLED_KERNEL_ARCH -----------------------------------------------------------------


def test_kernel_arch_replaces_native_and_names_the_build_folder(monkeypatch):
    monkeypatch.delenv("DECOUPLED_KERNEL_ARCH", raising=False)
    native_name, native_folder = _build.build_folder()
    assert "-march=native" in _build.compile_flags()
    monkeypatch.setenv("DECOUPLED_KERNEL_ARCH", "x86-64-v3")
    name, folder = _build.build_folder()
    assert "-march=x86-64-v3" in _build.compile_flags()
    assert "-march=native" not in _build.compile_flags()
    assert name == native_name + "_x86_64_v3" and folder != native_folder
    monkeypatch.setenv("DECOUPLED_KERNEL_ARCH", "x86-64 -O0")
    with pytest.raises(ValueError, match="Invalid DECOUPLED_KERNEL_ARCH value: 'x86-64 -O0'"):
        _build.build_folder()


AVX2_CHECK = """
import torch, decoupled
from decoupled.optim import _build
from decoupled.optim._cpu import cpu_summary
assert _build.kernel_ops() is not None
print(cpu_summary())
for state in (None, torch.bfloat16):
    for kwargs in ({}, {"amsgrad": True, "decay_to": "init"}):
        g = torch.Generator().manual_seed(0)
        a = torch.nn.Parameter(torch.randn(5000, generator=g))
        b = torch.nn.Parameter(a.detach().clone())
        fast = decoupled.AdamW([a], lr=1e-2, state_dtype=state, **kwargs)
        slow = decoupled.AdamW([b], lr=1e-2, state_dtype=state, fused=False, **kwargs)
        for _ in range(50):
            a.grad = torch.randn(5000, generator=g); b.grad = a.grad.clone()
            fast.step(); slow.step()
        assert (a - b).abs().max() < 1e-4, (state, kwargs)
        for key in ("exp_avg", "exp_avg_sq"):
            differ = (fast.state[a][key].float() != slow.state[b][key].float()).float().mean()
            assert differ < 1e-3, (state, kwargs, key, differ)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    "avx2" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
    reason="an AVX2 (x86-64-v3) build runs only on an AVX2 CPU",
)
def test_an_avx2_build_steps_like_the_reference(tmp_path):
    """The kernel built for x86-64-v3 (AVX2 + FMA, as on a Zen 2), float32 and bfloat16
    state, against the reference loop (a fresh build: about a minute)."""
    env = dict(os.environ, DECOUPLED_KERNEL_ARCH="x86-64-v3", TORCH_EXTENSIONS_DIR=str(tmp_path))
    env.pop("DECOUPLED_NO_KERNEL", None)
    done = subprocess.run(
        [sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-march=x86-64-v3" in done.stdout and done.stdout.strip().endswith("ok")


def test_cpu_summary_names_the_kernels_on_both_sides_of_a_comparison(monkeypatch):
    """Figures compare our kernel with torch's: the summary names the -march ours is built for
    and the instruction set torch dispatches its own CPU kernels to."""
    from decoupled.optim._cpu import cpu_summary

    monkeypatch.setenv("DECOUPLED_KERNEL_ARCH", "x86-64-v3")
    line = cpu_summary()
    assert "kernel built for -march=x86-64-v3" in line
    assert line.endswith(f"torch kernels: {torch.backends.cpu.get_cpu_capability()}")
