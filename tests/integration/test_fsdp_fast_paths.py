"""FSDP2 shards step through the C++ kernel (their local tensors), not the reference loop, and
still equal the unsharded run; SGD's momentum buffers created there stay DTensors."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

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
CASES = {"AdamW": {}, "SGDW": {"momentum": 0.9, "weight_decay": 0.1}}


def _worker(rank: int, world_size: int) -> dict:
    from decoupled.optim import _build

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
    for name, options in CASES.items():
        answers.clear()
        model = sharded_tiny_model(mesh)
        optimizer = make_optimizer(name, model, **options)
        train_steps(model, optimizer, range(STEPS), lambda s: local_batch(s, rank, world_size))
        weight = model[0].weight
        buffer = optimizer.state[weight].get(
            "momentum_buffer", optimizer.state[weight].get("exp_avg")
        )
        results[name] = {
            "params": full_params(model),
            "kernel_steps": list(answers),
            "state_is_dtensor": isinstance(buffer, DTensor),
        }
    return results


@pytest.mark.skipif(
    "not __import__('decoupled').optim.kernel_available()", reason="no C++ compiler here"
)
def test_fsdp2_shards_take_the_cpp_kernel_and_equal_the_unsharded_run(tmp_path):
    per_rank = run_distributed(_worker, tmp_path)
    for name, options in CASES.items():
        model = tiny_model()
        train_steps(model, make_optimizer(name, model, **options), range(STEPS), global_batch)
        expected = model.state_dict()
        for rank, results in enumerate(per_rank):
            result = results[name]
            # two groups (decayed, not decayed) per step, each one kernel call that stepped
            assert result["kernel_steps"] == [True] * (2 * STEPS), (name, rank)
            assert result["state_is_dtensor"]
            for key, value in result["params"].items():
                torch.testing.assert_close(value, expected[key], msg=f"{name} rank {rank} {key}")
