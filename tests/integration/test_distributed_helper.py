"""The multi-process helper itself: a failing worker fails the test with its traceback, and a
hanging worker is killed at the deadline instead of hanging the test session."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tests.integration._distributed import run_distributed

pytestmark = pytest.mark.distributed


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever for its dead peer


def _hanging_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)


def test_a_worker_exception_fails_the_test_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="(?s)rank 1.*ValueError: boom on rank 1"):
        run_distributed(_failing_worker, tmp_path)


def test_a_hanging_worker_is_killed_at_the_deadline(tmp_path):
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="still running after"):
        run_distributed(_hanging_worker, tmp_path, timeout=5)
    assert time.monotonic() - started < 60
