"""FSDP2 (``fully_shard``, DTensor parameters) and distributed checkpoints, two gloo processes.

Each rank holds a shard (rows) of every parameter, of its gradient and of its optimizer state;
``step()`` runs the elementwise update on the local shards and needs no communication. The
result must equal the unsharded single-process run, and the sharded state must survive a
``torch.distributed.checkpoint`` round trip with training continuing bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tests.integration._distributed import (
    OPTIMIZER_NAMES,
    local_batch,
    loss_fn,
    make_optimizer,
    run_distributed,
    single_process_params,
    tiny_model,
    train_steps,
)

pytestmark = pytest.mark.distributed

STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE = 3, 3


def sharded_tiny_model(mesh, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(seed)
    for layer in (model[0], model[3]):  # the Linear layers; the LayerNorm goes with the root
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach() for name, p in model.named_parameters()}


def _fsdp_worker(rank: int, world_size: int, checkpoint_root: str) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    total = STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE

    def batch(step):
        return local_batch(step, rank, world_size)

    results = {}
    for name in OPTIMIZER_NAMES:
        model = sharded_tiny_model(mesh)
        optimizer = make_optimizer(name, model)
        train_steps(model, optimizer, range(STEPS_BEFORE_SAVE), batch)
        checkpoint_id = f"{checkpoint_root}/{name}"
        dcp.save(
            {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, optimizer),
            },
            checkpoint_id=checkpoint_id,
        )
        first_weight = next(iter(model.parameters()))
        exp_avg = optimizer.state[first_weight]["exp_avg"]
        train_steps(model, optimizer, range(STEPS_BEFORE_SAVE, total), batch)

        # A fresh model (other seed, so the load must overwrite it) and a fresh optimizer.
        restored_model = sharded_tiny_model(mesh, seed=1)
        restored_optimizer = make_optimizer(name, restored_model)
        state = {
            "model": get_model_state_dict(restored_model),
            "optim": get_optimizer_state_dict(restored_model, restored_optimizer),
        }
        dcp.load(state, checkpoint_id=checkpoint_id)
        set_model_state_dict(restored_model, state["model"])
        set_optimizer_state_dict(restored_model, restored_optimizer, state["optim"])
        train_steps(restored_model, restored_optimizer, range(STEPS_BEFORE_SAVE, total), batch)

        results[name] = {
            "continued": full_params(model),
            "resumed": full_params(restored_model),
            "exp_avg_is_dtensor": isinstance(exp_avg, DTensor),
            "exp_avg_local_shape": tuple(exp_avg.to_local().shape),
            "decay_steps": [g["decay_steps"] for g in restored_optimizer.param_groups],
            "step": float(
                restored_optimizer.state[next(iter(restored_model.parameters()))]["step"]
            ),
        }
    return results


def test_fsdp2_steps_sharded_params_and_resumes_from_a_distributed_checkpoint(tmp_path):
    per_rank = run_distributed(_fsdp_worker, tmp_path, str(tmp_path / "checkpoints"))
    total = STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE
    for name in OPTIMIZER_NAMES:
        expected = single_process_params(name, total)
        for rank, results in enumerate(per_rank):
            result = results[name]
            # The state is sharded like its parameter: Linear(6, 16).weight's 16 rows, 8 a rank.
            assert result["exp_avg_is_dtensor"]
            assert result["exp_avg_local_shape"] == (8, 6)
            for key, value in expected.items():
                torch.testing.assert_close(
                    result["continued"][key], value, msg=f"{name} rank {rank} {key}"
                )
                # Same shards, same state, same batches: resuming is exact, not approximate.
                assert torch.equal(result["resumed"][key], result["continued"][key]), key
            # Step counters (torch's per-tensor `step`, our per-group `decay_steps`) came back.
            assert result["step"] == total
            assert result["decay_steps"] == [total, total]


def _skip_nonfinite_worker(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    model = sharded_tiny_model(mesh)
    optimizer = make_optimizer("AdamW", model, skip_nonfinite=True)
    before = full_params(model)
    optimizer.zero_grad()
    loss_fn(model, *local_batch(0, rank, world_size)).backward()
    if rank == 1:  # an overflow in one rank's shard only
        model[0].weight.grad.to_local()[0, 0] = math.inf
    optimizer.step()
    unchanged = all(torch.equal(before[k], v) for k, v in full_params(model).items())
    return {"skipped_steps": optimizer.skipped_steps, "unchanged": unchanged}


def test_skip_nonfinite_skips_on_every_rank_when_one_shard_overflows(tmp_path):
    """``skip_nonfinite`` decides on the whole gradient, not on the local shard: otherwise the
    rank that saw the inf would skip and the other step, and the replicas would diverge."""
    per_rank = run_distributed(_skip_nonfinite_worker, tmp_path)
    assert per_rank == [{"skipped_steps": 1, "unchanged": True}] * 2


def _mixed_precision_worker(rank: int, world_size: int, steps: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = tiny_model()
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = make_optimizer("AdamW", model)
    train_steps(model, optimizer, range(steps), lambda s: local_batch(s, rank, world_size))
    weight = model[0].weight
    return {
        "dtypes": (weight.dtype, weight.grad.dtype, optimizer.state[weight]["exp_avg"].dtype),
        "params": full_params(model),
    }


def test_fsdp2_mixed_precision_keeps_float32_master_weights_and_state(tmp_path):
    """bfloat16 compute, float32 master weights: FSDP2 casts the gathered parameters to bf16
    for forward/backward and reduces gradients in float32; the optimizer only ever sees the
    float32 shards, so its state is float32 too."""
    steps = 3
    per_rank = run_distributed(_mixed_precision_worker, tmp_path, steps)
    expected = single_process_params("AdamW", steps)
    initial = tiny_model().state_dict()
    for result in per_rank:
        assert result["dtypes"] == (torch.float32,) * 3
        for key, value in result["params"].items():
            # Adam's update is about ±lr per element, so bf16 gradients can flip the sign of
            # a small one: compare the whole update's direction with the float32 run's.
            update, reference = value - initial[key], expected[key] - initial[key]
            cosine = torch.nn.functional.cosine_similarity(update.flatten(), reference.flatten(), 0)
            assert cosine > 0.95, (key, float(cosine))
