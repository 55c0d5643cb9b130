"""DistributedDataParallel: two gloo processes on the CPU take the same steps as one process.

DDP averages the gradients of the ranks' batch halves before ``step()``, so each rank holds the
gradient of the whole global batch; the optimizer step is then purely local and elementwise
and must leave every rank's replica equal to a single-process run on the global batch. Only
the order of the gradient sums differs, hence float tolerance rather than bit equality.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from tests.integration._distributed import (
    OPTIMIZER_NAMES,
    local_batch,
    make_optimizer,
    run_distributed,
    single_process_params,
    tiny_model,
    train_steps,
)

pytestmark = pytest.mark.distributed

STEPS = 5


def _ddp_worker(rank: int, world_size: int, steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """Train one DDP replica per optimizer; return its parameters (same on every rank)."""
    results = {}
    for name in OPTIMIZER_NAMES:
        model = tiny_model()
        ddp_model = DistributedDataParallel(model)
        optimizer = make_optimizer(name, model)  # param_groups over the plain module's names
        train_steps(ddp_model, optimizer, range(steps), lambda s: local_batch(s, rank, world_size))
        results[name] = {key: value.detach() for key, value in model.state_dict().items()}
    return results


def test_ddp_matches_a_single_process_run_on_the_global_batch(tmp_path):
    per_rank = run_distributed(_ddp_worker, tmp_path, STEPS)
    for name in OPTIMIZER_NAMES:
        expected = single_process_params(name, STEPS)
        assert not torch.equal(expected["0.weight"], tiny_model().state_dict()["0.weight"])
        for rank, results in enumerate(per_rank):
            for key, value in expected.items():
                torch.testing.assert_close(
                    results[name][key], value, msg=f"{name} rank {rank} {key}"
                )
