"""Building and loading the one-pass C++ kernel (``csrc/``, interface ``csrc/steps.h``) on first
use.

``torch.utils.cpp_extension.load`` compiles it with the machine's C++ compiler and ninja into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``): its translation units (the
Python bindings, the Adam, int8 and SGD steps) compile in parallel, about 35 s on 2 cores. The
folder is named after the CPU's instruction sets, the source (the ``.cpp`` files and the ``.h``
parts they include) and the Python and torch versions, so a binary is never loaded on a
machine, or against a libtorch, it was not built for. Later processes load it in a fraction of
a second. ``DECOUPLED_NO_KERNEL=1`` never builds it.

``DECOUPLED_KERNEL_ARCH`` names the instruction sets to compile for, in place of
``-march=native``: ``x86-64-v3`` (AVX2 and FMA: Haswell, Zen 1–3), ``x86-64-v4`` (AVX-512),
``armv8.2-a``, or any other ``-march`` value GCC/Clang take. The name enters the build folder,
so builds for different targets sit side by side; a binary for instructions this CPU lacks
stops the process with an illegal instruction, so set it only to check what another CPU's
build does (tests/optim/test_build.py builds for AVX2 on an AVX-512 machine) or to build for a
cluster's common subset.

The kernel is compiled with ``-fno-trapping-math``: it reads no floating-point exception flag,
and without it GCC will not compute both arms of a select (lerp's two forms, a NaN check),
which leaves the loops scalar on CPUs without AVX-512 masked instructions. It changes no
result (IEEE operations round the same); ``-ffp-contract=off`` still forbids fused
multiply-adds the source does not write.

A cache folder that cannot be written (a read-only file system: an installed image, a shared
cluster cache) is not built into: a kernel already built there is imported directly, and
without one the warning names the folder and says that it is not writable.

Processes that build or load at the same time (a sweep's workers) take turns through an OS
file lock (``fcntl.flock`` on ``decoupled.lock`` in the build folder), which the OS releases
when its holder dies. torch's own guard, a ``lock`` file created while building and removed
afterwards (``torch.utils.file_baton.FileBaton``), is left behind when the builder is killed
(kill -9, out of memory), and every later process would wait for it forever in
``FileBaton.wait()``. Holding the OS lock, a process knows that no other one
is building, so a ``lock`` file still there is stale and is removed. Without ``fcntl``
(Windows) torch's guard works alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))  # the translation units
_PARTS = sorted(_CSRC.glob("*.h"))  # the parts they include, which enter the build's name too
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
_ARCH_VARIABLE = "DECOUPLED_KERNEL_ARCH"
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


def kernel_arch() -> str | None:
    """The ``-march`` target named by ``DECOUPLED_KERNEL_ARCH``; None (or empty): native."""
    arch = os.environ.get(_ARCH_VARIABLE, "").strip()
    if not arch:
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", arch):
        raise ValueError(
            f"Invalid {_ARCH_VARIABLE} value: {arch!r} (a -march target such as x86-64-v3, "
            "x86-64-v4 or armv8.2-a: letters, digits, '.', '_', '+', '-')"
        )
    return arch


def compile_flags() -> list[str]:
    """The compiler flags of this build: ``_FLAGS``, the ``-march`` target and, on x86, 512-bit
    vectors wherever the target has AVX-512 (GCC's tuning for Intel cores otherwise keeps
    256: on a Xeon the steps limited by their arithmetic, int8 moments and compensated
    weights, were then 25-45% slower)."""
    flags = [*_FLAGS, f"-march={kernel_arch() or 'native'}"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # no effect on a target without AVX-512
    return flags


def kernel_ops():
    """The C++ kernel's module (``adam_step_``, ``sgd_step_``), built on first use; None when
    it cannot be built or loaded (no compiler, no ninja, a read-only cache without a prebuilt
    kernel) with one warning, or with ``DECOUPLED_NO_KERNEL=1``."""
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

    flags = " ".join(compile_flags())
    code = b"".join(path.read_bytes() for path in (*_SOURCES, *_PARTS))
    source = hashlib.sha1(code + flags.encode()).hexdigest()[:8]
    arch = kernel_arch()
    target = _cpu_tag() if arch is None else f"{_cpu_tag()}_{re.sub(r'[^A-Za-z0-9]', '_', arch)}"
    name = f"decoupled_kernels_{target}"
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
    try:
        _claim(folder)
    except OSError as error:  # a read-only cache: an installed image, a shared cluster cache
        _ops = _load_prebuilt(name, folder, error)
        return
    if not (folder / f"{name}.so").exists():
        print(
            "decoupled: building the one-pass CPU optimizer kernel (once per machine, under a "
            "minute)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with _exclusive(folder):
            _ops = cpp_extension.load(
                name=name,
                sources=[str(path) for path in _SOURCES],
                build_directory=str(folder),
                extra_cflags=compile_flags(),
                extra_ldflags=["-fopenmp"],
            )
    except Exception as error:  # a missing compiler raises OSError, RuntimeError, ...
        _ops = None
        _warn(f"could not be built ({_last_line(error)})")


def _claim(folder: Path) -> None:
    """Create the build ``folder`` and its lock file, or raise the OSError that says why not
    (EROFS, EACCES): building, and torch's loader, which writes its own lock file, need both."""
    folder.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    os.close(os.open(folder / "decoupled.lock", flags, 0o666))


def _load_prebuilt(name: str, folder: Path, error: OSError):
    """The kernel that a read-only ``folder`` already holds, imported directly (torch's
    loader would write there); None, with a warning that says why, when there is none or it
    does not load. The folder's name pins CPU, source, Python and torch (``build_folder``),
    so a binary found there is the one this process would have built."""
    library = folder / f"{name}.so"
    reason = error.strerror or type(error).__name__
    if not library.exists():
        _warn(
            f"was not built: the kernel cache {folder} is not writable ({reason}) and holds no "
            "prebuilt kernel; set TORCH_EXTENSIONS_DIR to a writable folder to build it"
        )
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as load_error:  # a damaged or foreign binary: ImportError, OSError
        _warn(
            f"was not loaded: the prebuilt kernel {library} in the read-only cache failed to "
            f"load ({_last_line(load_error)})"
        )
        return None
    return module


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _warn(what: str) -> None:
    warnings.warn(
        f"decoupled: the one-pass CPU kernel {what}; steps use torch's fused kernels or the "
        "reference loop instead",
        RuntimeWarning,
        stacklevel=4,
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
