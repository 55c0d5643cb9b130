"""The suite's own grouping works. pyproject's addopts run it with ``--dist loadgroup``, and the
tests that start training processes are marked ``xdist_group("processes")`` so that one worker
runs them one at a time (tests/conftest.py). pytest 9.2 silently broke that grouping
(pytest-xdist issue 1386: the test ids that name the group no longer take effect), and the
suite then ran those tests two at a time without saying so; constraints.txt excludes it. This
test fails if the grouping stops working again."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.xdist_group("processes")

GROUPED = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import pytest

    pytestmark = pytest.mark.xdist_group("together")


    @pytest.mark.parametrize("i", range(6))
    def test_worker(i):
        Path(__file__).with_name(f"ran-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
    """
)


def test_tests_of_one_xdist_group_run_in_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    result = subprocess.run(
        [*command, "-n", "2", "--dist", "loadgroup", "test_grouped.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    workers = {(tmp_path / f"ran-{i}").read_text() for i in range(6)}
    assert len(workers) == 1, f"the group ran on {sorted(workers)}"
