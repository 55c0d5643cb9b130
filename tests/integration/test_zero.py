"""ZeroRedundancyOptimizer (ZeRO stage 1) wrapping ``decoupled.Adam``/``AdamW``, two gloo ranks.

ZeRO builds one local ``optimizer_class`` per rank over that rank's partition of the parameter
tensors, steps it, then broadcasts each partition's updated parameters from its owner. Our
optimizers only need to be ordinary ``torch.optim.Optimizer`` classes for that: the run must
match a single process, and each rank must hold optimizer state for its partition only.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

with warnings.catch_warnings():  # torch.distributed.optim imports torch.jit's deprecated API
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.distributed.optim import ZeroRedundancyOptimizer

import decoupled
from tests.integration._distributed import (
    LR,
    OPTIMIZER_NAMES,
    WEIGHT_DECAY,
    local_batch,
    run_distributed,
    single_process_params,
    tiny_model,
    train_steps,
)

pytestmark = pytest.mark.distributed

STEPS = 5


def _zero_worker(rank: int, world_size: int, steps: int) -> dict:
    results = {}
    for name in OPTIMIZER_NAMES:
        model = tiny_model()
        ddp_model = DistributedDataParallel(model)
        optimizer = ZeroRedundancyOptimizer(
            decoupled.param_groups(model, WEIGHT_DECAY, verbose=False),
            optimizer_class=getattr(decoupled, name),
            lr=LR,
        )
        train_steps(ddp_model, optimizer, range(steps), lambda s: local_batch(s, rank, world_size))
        results[name] = {
            "params": {key: value.detach() for key, value in model.state_dict().items()},
            "tensors_with_state": len(optimizer.optim.state),
            "local_optimizer": type(optimizer.optim).__name__,
        }
    return results


def test_zero_redundancy_optimizer_matches_a_single_process_run(tmp_path):
    per_rank = run_distributed(_zero_worker, tmp_path, STEPS)
    n_tensors = len(list(tiny_model().parameters()))
    for name in OPTIMIZER_NAMES:
        expected = single_process_params(name, STEPS)
        for rank, results in enumerate(per_rank):
            assert results[name]["local_optimizer"] == name
            for key, value in expected.items():
                torch.testing.assert_close(
                    results[name]["params"][key], value, msg=f"{name} rank {rank} {key}"
                )
        # The state is partitioned: every tensor's state lives on exactly one rank.
        counts = [results[name]["tensors_with_state"] for results in per_rank]
        assert sum(counts) == n_tensors and all(0 < c < n_tensors for c in counts), counts
