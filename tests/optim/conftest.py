"""Fixtures for the optimizer tests: which path each step took."""

from __future__ import annotations

import importlib

import pytest
import torch

import decoupled
from decoupled.optim import _build, _kernels


class RecordingOps:
    """The C++ kernel's module, recording each op's answer (False: refused, nothing changed)."""

    def __init__(self, ops, answers: list[bool]):
        self.ops, self.answers = ops, answers

    def __getattr__(self, name: str):
        op = getattr(self.ops, name)

        def recording(*args):
            self.answers.append(op(*args))
            return self.answers[-1]

        return recording


@pytest.fixture
def path_log(monkeypatch):
    """The name of the update function each step used, in call order.

    When the C++ kernel refuses a step, its wrapper runs the reference loop instead without a
    word; such a step is logged as ``"kernel_adam_update (refused)"`` (or ``sgd``), so that a
    test meaning the kernel fails when only the reference loop ran."""
    used: list[str] = []
    answers: list[bool] = []
    ops = _build.kernel_ops()
    if ops is not None:
        monkeypatch.setattr(_build, "_ops", RecordingOps(ops, answers))
    for name in ("choose_adam_update", "choose_sgd_update"):
        chooser = getattr(_kernels, name)

        def recording(*args, _chooser=chooser, **kwargs):
            update = _chooser(*args, **kwargs)
            used.append(update.__name__)
            if not update.__name__.startswith("kernel_"):
                return update
            position = len(used) - 1

            def checked(*update_args, **update_kwargs):
                answers.clear()
                update(*update_args, **update_kwargs)
                if not any(answers):  # a layout retry may follow a refusal
                    used[position] += " (refused)"

            return checked

        module = decoupled.optim.adam if "adam" in name else decoupled.optim.sgd
        monkeypatch.setattr(module, name, recording)
    return used


@pytest.fixture
def without_kernel(monkeypatch):
    """As on a machine where the C++ kernel cannot be built."""
    monkeypatch.setattr(_build, "_ops", None)


@pytest.fixture
def one_thread():
    """Run a test's torch ops on one thread. For the parity tests' tiny models, and on a busy
    machine, each op's thread-pool handshake costs about ten times the work itself (measured:
    0.1 s instead of 1 s per convnet case). Both sides of each comparison (ours and torch's)
    still run with the same threads, so what is compared is unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The Triton kernels run by the interpreter on CPU tensors, in chunks of 64 elements (so
    that small tensors cross chunk boundaries); the Triton test modules use it for every test."""
    from decoupled.optim import _triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton, "BLOCK", 64)


class _Launches(dict):
    """How many times each Triton kernel was launched (``launches["adam_kernel"]``), and
    the keyword arguments of each launch (``launches.options["adam_kernel"]``)."""

    def __init__(self):
        super().__init__(adam_kernel=0, sgd_kernel=0)
        self.options: dict[str, list[dict]] = {name: [] for name in self}

    def recording(self, name: str, kernel):
        """A stand-in for ``kernel`` that records each launch, then launches it."""
        launches = self

        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **options):
                    launches[name] += 1
                    launches.options[name].append(options)
                    return kernel[grid](*args, **options)

                return launch

        return Recording()


@pytest.fixture
def launches(monkeypatch):
    """The Triton kernels' launches (``_Launches``; a refusal launches nothing)."""
    kernels = importlib.import_module("decoupled.optim._triton_kernels")
    recorded = _Launches()
    for name in list(recorded):
        monkeypatch.setattr(kernels, name, recorded.recording(name, getattr(kernels, name)))
    return recorded


@pytest.fixture
def exact_sqrt(monkeypatch):
    """The reference loop with a correctly rounded ``sqrt``, as the C++ and Triton kernels
    compute it (torch's CPU float32 ``sqrt`` is not always; float64 then rounded is exact)."""
    torch_sqrt = torch.Tensor.sqrt
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda t: torch_sqrt(t.double()).to(t.dtype))
