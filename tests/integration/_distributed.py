"""Run a test function in several local processes (gloo on the CPU) and collect what each returns.

Why not ``torch.multiprocessing.spawn(..., join=True)``: it waits forever when a worker hangs in
a collective (e.g. its peer died before an all-reduce). Here every wait has a deadline; a worker
that raises or crashes makes the test fail with every worker's traceback or crash dump, and
stragglers are killed by their process ids.

A worker is a module-level function ``worker(rank, world_size, *args) -> picklable``; it runs
after ``torch.distributed`` is initialized (gloo, rendezvous through a file store in the test's
temporary folder, so no port has to be free) and its return value comes back to the test.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
#: Whole-run deadline; a healthy run takes a few seconds (mostly importing torch twice).
DEFAULT_TIMEOUT_S = 90.0
#: gloo's own timeout for one collective, so that a lonely rank errors instead of waiting.
COLLECTIVE_TIMEOUT_S = 30.0


def _entry(
    rank: int,
    worker: Callable[..., Any],
    world_size: int,
    init_file: str,
    result_dir: str,
    args: tuple,
) -> None:
    # A crash in C++ (a signal, not an exception) leaves no Python traceback: have
    # faulthandler write the stacks of every thread where the parent can read them.
    crash_log = open(os.path.join(result_dir, f"rank{rank}.crash"), "w")  # noqa: SIM115
    faulthandler.enable(file=crash_log, all_threads=True)
    # Two ranks share two (busy) cores: more intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        result = worker(rank, world_size, *args)
        # Written to a file rather than a queue: a queue's feeder thread can deadlock a
        # process that exits while the parent is not reading (torch's spawn avoids it too).
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        # Leave together: no rank closes its connections while the other still needs them.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown. With torch 2.13, a process that used DDP (even with no
    # optimizer) and called destroy_process_group() on gloo sometimes aborts at exit, after
    # its last Python frame ("terminate called without an active exception"; about half of
    # `torchrun --nproc-per-node 2` runs here), although its work was done and saved.
    crash_log.flush()
    os._exit(0)


def _failure_report(context: mp.ProcessContext, result_dir: Path) -> str:
    """Every worker's Python traceback or crash dump, rank by rank: the first rank to fail is
    often only a victim (its peer closed the connection), the cause is in another rank."""
    sections = []
    for rank, (process, error_file) in enumerate(zip(context.processes, context.error_files)):
        text = ""
        if os.path.exists(error_file):
            with open(error_file, "rb") as fh:
                text = pickle.load(fh)
        crash = result_dir / f"rank{rank}.crash"
        if not text and crash.exists():
            text = crash.read_text()
        sections.append(f"-- rank {rank} (exit code {process.exitcode}):\n{text or '(no output)'}")
    return "distributed worker failed\n" + "\n".join(sections)


def run_distributed(
    worker: Callable[..., Any],
    tmp_path: Path,
    *args: Any,
    world_size: int = WORLD_SIZE,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Returns the workers' return values, by rank. Fails the test with every worker's traceback
    (or crash dump) if one fails, and kills every worker and fails if they are not all done
    by ``timeout`` seconds.
    """
    init_file = tmp_path / "rendezvous"
    result_dir = tmp_path / "results"
    result_dir.mkdir(exist_ok=True)
    context = mp.start_processes(
        _entry,
        args=(worker, world_size, str(init_file), str(result_dir), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        # join() returns True when all have exited cleanly, and raises (after terminating the
        # others) as soon as one has failed; a short timeout turns it into a polling loop.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                alive = [p.pid for p in context.processes if p.is_alive()]
                pytest.fail(f"distributed workers still running after {timeout:.0f} s: {alive}")
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        pytest.fail(_failure_report(context, result_dir), pytrace=False)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [
        torch.load(result_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
    ]


# -- the shared experiment: a tiny model, a global batch per step, two optimizers ------------

GLOBAL_BATCH = 8
OPTIMIZER_NAMES = ("Adam", "AdamW")  # Adam: L2 in the gradient; AdamW: decoupled decay
LR = 1e-2
WEIGHT_DECAY = 0.1


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Two linear layers around a LayerNorm: decayed weights, undecayed biases and norm."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (inputs, targets) for a step in every process (seeded by the step)."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    targets = torch.randn(GLOBAL_BATCH, 4, generator=generator)
    return inputs, targets


def local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal slice of the global batch (data parallelism)."""
    per_rank = GLOBAL_BATCH // world_size
    inputs, targets = global_batch(step)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return inputs[rows], targets[rows]


def make_optimizer(name: str, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """``decoupled.Adam``/``AdamW`` over ``param_groups`` (no decay for biases and the norm)."""
    import decoupled

    groups = decoupled.param_groups(model, WEIGHT_DECAY, verbose=False)
    return getattr(decoupled, name)(groups, lr=LR, **kwargs)


def loss_fn(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(inputs), targets)


def train_steps(model, optimizer, steps: range, batch: Callable[[int], tuple]) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_fn(model, *batch(step)).backward()
        optimizer.step()


def single_process_params(name: str, steps: int) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch each step."""
    model = tiny_model()
    train_steps(model, make_optimizer(name, model), range(steps), global_batch)
    return {key: value.detach() for key, value in model.state_dict().items()}
