"""Building and loading the one-pass C++ kernel (``csrc/kernels.cpp``) on first use.

``torch.utils.cpp_extension.load`` compiles it with the machine's C++ compiler and ninja
(about 30 s) into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), in a folder
named after the CPU's instruction sets, the source and the Python and torch versions, so a
binary is never loaded on a machine, or against a libtorch, it was not built for. Later
processes load it in a fraction of a second. ``DECOUPLED_NO_KERNEL=1`` never builds it.

Processes that build or load at the same time (a sweep's workers) take turns through an OS
file lock (``fcntl.flock`` on ``decoupled.lock`` in the build folder), which the OS releases
when its holder dies. torch's own guard, a ``lock`` file created while building and removed
afterwards (``torch.utils.file_baton.FileBaton``), is left behind when the builder is killed
(kill -9, out of memory), and every later process would wait for it forever in
``FileBaton.wait()``. Holding the OS lock, a process knows that no other one
is building, so a ``lock`` file still there is stale and is removed. Without ``fcntl``
(Windows) torch's guard works alone, as before.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
_NOT_TRIED = object()
_ops = _NOT_TRIED
_building = threading.Lock()


def _cpu_tag() -> str:
    """A short name for this CPU's instruction sets: ``-march=native`` binaries are not
    portable, and a home directory (the build cache) may be shared by different machines."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def kernel_ops():
    """The C++ kernel's module (``adam_step_``, ``sgd_step_``), built on first use; None when
    it cannot be built (no compiler, no ninja, ``DECOUPLED_NO_KERNEL=1``), with one warning."""
    if _ops is _NOT_TRIED:
        with _building:  # one build per process; other threads wait for it
            if _ops is _NOT_TRIED:
                _build()
    return _ops


def build_folder() -> tuple[str, Path]:
    """The extension's name and its build folder: one per CPU, source, Python and torch
    version, so that a binary built from other code or against another libtorch is never
    loaded."""
    from torch.utils import cpp_extension

    source = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:8]
    name = f"decoupled_kernels_{_cpu_tag()}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    version = f"{source}_{python}_torch{torch.__version__}".replace("+", "_")
    return name, Path(root, f"{name}_{version}")


def _build() -> None:
    global _ops
    if os.environ.get("DECOUPLED_NO_KERNEL", "") not in ("", "0"):
        _ops = None
        return
    from torch.utils import cpp_extension

    name, folder = build_folder()
    if not (folder / f"{name}.so").exists():
        print(
            "decoupled: building the one-pass CPU optimizer kernel (once per machine, ~30 s)",
            file=sys.stderr,
            flush=True,
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder):
            _ops = cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                build_directory=str(folder),
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
            )
    except Exception as error:  # a missing compiler raises OSError, RuntimeError, ...
        _ops = None
        warnings.warn(
            f"decoupled: the one-pass CPU kernel could not be built ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); steps use "
            "torch's fused kernels or the reference loop instead",
            RuntimeWarning,
            stacklevel=2,
        )


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold the OS lock of the build ``folder`` (waiting for another process to finish its
    build or load), after removing a stale torch ``lock`` file (see the module docstring)."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's FileBaton alone
        yield
        return
    with open(folder / "decoupled.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if this process dies
        except OSError as error:  # a file system without flock (Lustre without -o flock, ...)
            warnings.warn(
                f"decoupled: no file lock in {folder} ({error}); relying on torch's lock file",
                RuntimeWarning,
                stacklevel=2,
            )
            yield  # torch's guard alone, as on Windows; nothing is removed
            return
        try:
            _remove_stale_baton(folder)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_baton(folder: Path) -> None:
    """Remove torch's ``lock`` file from ``folder``: only a holder of the OS lock builds, so
    one found by a holder was left by a builder that died."""
    baton = folder / "lock"
    if baton.exists():
        warnings.warn(
            f"decoupled: removing {baton}, left by a build that was interrupted",
            RuntimeWarning,
            stacklevel=2,
        )
        baton.unlink(missing_ok=True)
