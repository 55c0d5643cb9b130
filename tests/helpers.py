"""Shared test fixtures: small models, a deterministic training loop, state comparison."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizerInput:
    """One row of an optimizer table (PyTorch's ``OptimizerInput`` idea): kwargs + a label.

    ``kwargs`` is a fresh deep copy at every access. A row's tensor lr is otherwise one tensor
    shared by every test that uses the row, and by both optimizers of a comparison: a
    scheduler's in-place update of it leaked into later tests (which then ran with lr 0)."""

    stored: dict = field(default_factory=dict)
    desc: str = ""

    @property
    def kwargs(self) -> dict:
        return copy.deepcopy(self.stored)

    def __repr__(self) -> str:
        return self.desc or repr(self.stored)


class RMSNorm(nn.Module):
    """A custom norm layer (its class name ends in 'Norm'), not torch's nn.RMSNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.scale * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )


def normed_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), RMSNorm(12), nn.Linear(12, 3)
    )


MODEL_BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (8, 6)),
    "convnet": (convnet, (8, 2, 4, 4)),
    "normed_mlp": (normed_mlp, (8, 6)),
}


def make_model(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    builder, input_shape = MODEL_BUILDERS[name]
    torch.manual_seed(seed)
    return builder().to(dtype), input_shape


def train(
    model: nn.Module, optimizer, input_shape, steps: int, dtype, seed: int = 1, scheduler=None
):
    """Train on a fixed random regression stream; the same seed gives the same batches.

    An optimizer with ``maximize=True`` is given the negated loss, so it still descends.
    """
    sign = -1.0 if optimizer.param_groups[0].get("maximize") else 1.0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(input_shape, generator=generator, dtype=dtype)
        target = torch.randn(input_shape[0], 3, generator=generator, dtype=dtype)
        optimizer.zero_grad()
        loss = sign * (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def drawn_sgd_options(drawn: dict, lr: float) -> tuple[type, dict]:
    """A hypothesis draw of SGD options made valid: its ``cls`` apart, Nesterov only with
    momentum and no dampening, ``lr="tensor"`` as a tensor of ``lr``."""
    options = dict(drawn)
    cls = options.pop("cls")
    if options["nesterov"] and (options["momentum"] == 0 or options["dampening"] != 0):
        options["nesterov"] = False
    if options["lr"] == "tensor":
        options["lr"] = torch.tensor(lr)
    return cls, options


def twin_models(name: str, dtype: torch.dtype):
    model, input_shape = make_model(name, dtype)
    return model, copy.deepcopy(model), input_shape


def assert_same_training_state(ours, theirs, model_ours, model_theirs, rtol=0.0, atol=0.0):
    """Parameters and every state tensor of two optimizers agree (exactly by default)."""
    for (name, p_ours), p_theirs in zip(model_ours.named_parameters(), model_theirs.parameters()):
        torch.testing.assert_close(p_ours, p_theirs, rtol=rtol, atol=atol, msg=f"param {name}")
        state_ours, state_theirs = ours.state[p_ours], theirs.state[p_theirs]
        assert set(state_ours) == set(state_theirs), (name, set(state_ours), set(state_theirs))
        for key, value in state_theirs.items():
            if value is None:
                assert state_ours[key] is None, (name, key)
                continue
            torch.testing.assert_close(
                state_ours[key], value, rtol=rtol, atol=atol, msg=f"state {key} of {name}"
            )


def run_cli(*args: str, timeout: float = 300):
    """Run the `decoupled` command in a subprocess; returns the CompletedProcess (text)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "decoupled", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_here(*args: str):
    """Run ``decoupled.cli.main`` in this process, as ``run_cli`` runs the command: returns a
    CompletedProcess with the exit status and the text written to stdout and stderr (warnings
    included, as a subprocess would print them). Far faster than a subprocess (no interpreter
    start, no torch import) for commands that end before any work, such as refusals of bad
    input; ``run_cli`` keeps testing the installed entry point itself."""
    import contextlib
    import io
    import subprocess
    import warnings

    from decoupled.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("default")
        try:
            status = main(list(args))
        except SystemExit as stop:  # argparse's error() exits 2
            status = stop.code if isinstance(stop.code, int) else 1
    for warning in caught:
        stderr.write(warnings.formatwarning(warning.message, warning.category, "", 0))
    return subprocess.CompletedProcess(
        ["decoupled", *args], status, stdout.getvalue(), stderr.getvalue()
    )


def wait_for_finished_runs(db, minimum: int, timeout: float = 120.0) -> int:
    """Poll a results.db (without creating it) until ``minimum`` runs are done; returns the
    count seen last (the caller asserts on it)."""
    import sqlite3
    import time
    from contextlib import closing

    done, deadline = 0, time.time() + timeout
    while time.time() < deadline and done < minimum:
        if db.exists():
            try:
                with closing(sqlite3.connect(db, timeout=5)) as connection:  # closed each time
                    done = connection.execute(
                        "SELECT count(*) FROM runs WHERE status = 'done'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:  # the table is not created yet
                done = 0
        time.sleep(0.1)
    return done


def twin_groups(cls, options, dtype, groups=3, steps=4, numel=1000, **path):
    """An optimizer over ``groups`` groups of one parameter each, every parameter starting
    from the same values and fed the same gradients; the optimizer and its parameters."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(numel, generator=generator).to(dtype)
    params = [torch.nn.Parameter(start.clone()) for _ in range(groups)]
    optimizer = cls([{"params": [p]} for p in params], lr=1e-3, weight_decay=0.1,
                    **options, **path)  # fmt: skip
    for _ in range(steps):
        grad = torch.randn(numel, generator=generator).to(dtype)
        for p in params:
            p.grad = grad.clone()
        optimizer.step()
    return optimizer, params


def rounded_tensors(optimizer, param) -> dict[str, torch.Tensor]:
    """θ and every state tensor but the step count, as integers (bits) for comparison."""
    tensors = {"θ": param.detach(), **optimizer.state[param]}
    tensors.pop("step", None)
    return {
        key: t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        for key, t in tensors.items()
        if isinstance(t, torch.Tensor)
    }


def assert_rounded_alike(ours, our_params, reference, reference_params, exact: bool) -> None:
    """``rounded_tensors`` of two runs, parameter by parameter: float32 θ to 1e-6, int8 block
    scales (and every tensor where ``exact``) bit for bit, the other rounded tensors in at
    least 99 % of their entries (torch's CPU sqrt is an ulp off now and then, ``_kernels.py``;
    tensors keyed as other ones differ in far more)."""
    for p, q in zip(our_params, reference_params):
        mine, theirs = rounded_tensors(ours, p), rounded_tensors(reference, q)
        assert mine.keys() == theirs.keys()
        for key in mine:
            if key == "θ" and mine[key].dtype == torch.float32:
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=1e-7)
            elif exact or key.endswith("_scale"):
                assert torch.equal(mine[key], theirs[key]), key
            else:
                differing = (mine[key] != theirs[key]).float().mean().item()
                assert differing <= 0.01, (key, differing)


def steps_with_a_shared_gradient(cls, numel: int, steps: int = 2, **path) -> list[torch.Tensor]:
    """``steps`` steps of two parameters (ones) whose ``.grad`` is one tensor (4096 each),
    under GradScaler's fused protocol with scale 64: the last gradient, θ and every state
    tensor, in that order."""
    momentum = {"momentum": 0.9} if "SGD" in cls.__name__ else {}
    params = [torch.nn.Parameter(torch.ones(numel)) for _ in range(2)]
    optimizer = cls(params, lr=0.1, weight_decay=0.1, **path, **momentum)
    for _ in range(steps):
        shared = torch.full((numel,), 4096.0)
        params[0].grad = params[1].grad = shared
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(64.0), torch.zeros(())
        optimizer.step()
    state = [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t)]
    return [shared, *(p.detach() for p in params), *state]


def finish_interrupted_at(store, call: int) -> list[str]:
    """Make ``store.finish`` raise KeyboardInterrupt at its ``call``-th call, as a Ctrl-C
    landing while a result is written; the other calls write. Returns the keys it was called
    with, in order."""
    real_finish, calls = store.finish, []

    def finish(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_finish(*args, **kwargs)

    store.finish = finish
    return calls


def small_decay_table(steps=(1, 2)):
    """A decay-monitor table of one 2x2 weight at ``steps``, every float column set."""
    from decoupled.diagnostics.table import COLUMNS, DecayRecord, DecayTable

    floats = {name: 0.25 * i for i, name in enumerate(COLUMNS[7:])}
    return DecayTable(
        [DecayRecord(s, "fc.weight", "2x2", 4, True, False, "decoupled", **floats) for s in steps]
    )
