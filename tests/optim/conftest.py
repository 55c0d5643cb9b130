"""Fixtures for the optimizer tests: which path each step took."""

from __future__ import annotations

import pytest
import torch

import decoupled
from decoupled.optim import _build, _kernels


class RecordingOps:
    """The C++ kernel's module, recording each op's answer (False: refused, nothing changed)."""

    def __init__(self, ops, answers: list[bool]):
        self.ops, self.answers = ops, answers

    def adam_step_(self, *args):
        self.answers.append(self.ops.adam_step_(*args))
        return self.answers[-1]

    def sgd_step_(self, *args):
        self.answers.append(self.ops.sgd_step_(*args))
        return self.answers[-1]

    def adam_int8_step_(self, *args):
        self.answers.append(self.ops.adam_int8_step_(*args))
        return self.answers[-1]

    def adam_compensated_step_(self, *args):
        self.answers.append(self.ops.adam_compensated_step_(*args))
        return self.answers[-1]

    def sgd_compensated_step_(self, *args):
        self.answers.append(self.ops.sgd_compensated_step_(*args))
        return self.answers[-1]


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
