"""FSDP2 shards step through their local tensors' fast path, not the reference loop — the C++
kernel, and the Triton kernel (here under its interpreter, as on CUDA shards) — and still equal
the unsharded run; SGD's momentum buffers created there stay DTensors."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tests.integration._distributed import (
    global_batch,
    local_batch,
    make_optimizer,
    run_distributed,
    tiny_model,
    train_steps,
)
from tests.integration.test_fsdp import full_params, sharded_tiny_model

pytestmark = pytest.mark.distributed

STEPS = 3
CASES = {
    "AdamW": ("AdamW", {}),
    "SGDW": ("SGDW", {"momentum": 0.9, "weight_decay": 0.1}),
    "AdamW triton": ("AdamW", {"triton": True}),
}


def _worker(rank: int, world_size: int, cases: list[str]) -> dict:
    import os

    from decoupled.optim import _build

    launches = []
    if any("triton" in label for label in cases):
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are first imported
        from decoupled.optim import _triton_kernels

        kernel = _triton_kernels.adam_kernel

        class Counting:  # each launch of the Triton kernel
            def __getitem__(self, grid):
                launches.append(grid[0])
                return kernel[grid]

        _triton_kernels.adam_kernel = Counting()

    ops = _build.kernel_ops()
    answers: list[bool] = []

    class Recording:  # each op's answer: False would mean it refused and the loop stepped
        def adam_step_(self, *args):
            answers.append(ops.adam_step_(*args))
            return answers[-1]

        def sgd_step_(self, *args):
            answers.append(ops.sgd_step_(*args))
            return answers[-1]

    _build._ops = Recording()
    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for label in cases:
        name, options = CASES[label]
        answers.clear()
        launches.clear()
        model = sharded_tiny_model(mesh)
        optimizer = make_optimizer(name, model, **options)
        train_steps(model, optimizer, range(STEPS), lambda s: local_batch(s, rank, world_size))
        weight = model[0].weight
        buffer = optimizer.state[weight].get(
            "momentum_buffer", optimizer.state[weight].get("exp_avg")
        )
        results[label] = {
            "params": full_params(model),
            "kernel_steps": list(answers),
            "triton_steps": list(launches),
            "state_is_dtensor": isinstance(buffer, DTensor),
        }
    return results


@pytest.mark.skipif(
    "not __import__('decoupled').optim.kernel_available()", reason="no C++ compiler here"
)
def test_fsdp2_shards_take_the_fast_paths_and_equal_the_unsharded_run(tmp_path):
    from decoupled.optim._triton import triton_available

    cases = [label for label in CASES if triton_available() or "triton" not in label]
    per_rank = run_distributed(_worker, tmp_path, cases)
    for label in cases:
        name, options = CASES[label]
        options = {k: v for k, v in options.items() if k != "triton"}
        model = tiny_model()
        train_steps(model, make_optimizer(name, model, **options), range(STEPS), global_batch)
        expected = model.state_dict()
        for rank, results in enumerate(per_rank):
            result = results[label]
            # two groups (decayed, not decayed) per step, each one kernel call that stepped
            on_triton = "triton" in label
            assert result["kernel_steps"] == [True] * (0 if on_triton else 2 * STEPS), label
            assert len(result["triton_steps"]) == (2 * STEPS if on_triton else 0), label
            assert result["state_is_dtensor"]
            for key, value in result["params"].items():
                torch.testing.assert_close(value, expected[key], msg=f"{label} rank {rank} {key}")


def _rounding_worker(rank: int, world_size: int) -> dict:
    """Twin shards: a (2, 600) weight sharded by rows and a replicated one, both with equal
    rows and equal gradient rows, bfloat16 moments; this rank's local moment bits."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import decoupled

    mesh = init_device_mesh("cpu", (world_size,))
    row = torch.randn(600, generator=torch.Generator().manual_seed(0))
    full, grad = row.expand(2, 600).clone(), (row * 0.1).expand(2, 600).clone()
    placements = {"sharded": Shard(0), "replicated": Replicate()}

    def moment_bits(optimizer, param) -> dict:
        state = optimizer.state[param]
        return {k: state[k].to_local().view(torch.int16).clone() for k in ("exp_avg", "exp_avg_sq")}

    def stepped(labels: list[str]):  # one optimizer, one group holding these parameters
        params = [
            torch.nn.Parameter(distribute_tensor(full, mesh, [placements[label]]))
            for label in labels
        ]
        optimizer = decoupled.AdamW(params, lr=1e-2, state_dtype=torch.bfloat16)
        for _ in range(3):
            for label, param in zip(labels, params):
                param.grad = distribute_tensor(grad, mesh, [placements[label]])
            optimizer.step()
        return [moment_bits(optimizer, param) for param in params]

    results = {label: stepped([label])[0] for label in placements}
    # a list mixing placements is stepped in runs of one placement, each keyed by its shard
    results["mixed sharded"], results["mixed replicated"] = stepped(["sharded", "replicated"])
    # SGD's momentum buffers, created inside the runs, come back as DTensors like their weights
    params = [torch.nn.Parameter(distribute_tensor(full, mesh, [p])) for p in placements.values()]
    sgd = decoupled.SGDW(params, lr=1e-2, momentum=0.9, weight_decay=0.1)
    for param, placement in zip(params, placements.values()):
        param.grad = distribute_tensor(grad, mesh, [placement])
    sgd.step()
    buffers = [sgd.state[param]["momentum_buffer"] for param in params]
    results["buffer placements"] = [tuple(b.placements) for b in buffers]
    return results


@pytest.mark.skipif(
    "not __import__('decoupled').optim.kernel_available()", reason="no C++ compiler here"
)
def test_shards_on_different_ranks_draw_different_bits_and_replicas_the_same(tmp_path):
    """Rows 0 and 1 of the sharded weight live on ranks 0 and 1 at the same local index and
    hold the same values: keyed by the rank's shard index, their bfloat16 moments round
    apart; the replicated weight's copies round alike on every rank. Both hold also when the
    two weights share one param group (one list mixing placements)."""
    first, second = run_distributed(_rounding_worker, tmp_path)
    for key in ("exp_avg", "exp_avg_sq"):
        for sharded, replicated in (
            ("sharded", "replicated"),
            ("mixed sharded", "mixed replicated"),
        ):
            assert not torch.equal(first[sharded][key], second[sharded][key]), (sharded, key)
            assert torch.equal(first[replicated][key], second[replicated][key]), (replicated, key)
    assert first["buffer placements"] == [(Shard(0),), (Replicate(),)]
