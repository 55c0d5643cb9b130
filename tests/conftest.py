"""Hypothesis profiles, one torch thread per xdist worker, Ctrl-C reaching test processes.

``default`` draws the same examples on every run (``derandomize``), so a run that lands or is
refused says something about the change and not about the draw. ``explore`` draws new ones:
``python -m pytest --hypothesis-profile=explore`` searches for cases the fixed draw misses;
a failure it finds is pinned with ``@example`` before it is fixed."""

import os
import signal

import torch
from hypothesis import settings

settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")

# A shell starts a background job (`cmd &`) with SIGINT ignored, and every process it starts
# inherits that. The tests that interrupt a compare or a sweep with SIGINT, as Ctrl-C would,
# then saw it finish every run instead. Handled here, SIGINT is back to its default in each
# process a test starts (exec resets a handled signal, not an ignored one).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    """pyproject's addopts run the suite in pytest-xdist workers, one per core. Each worker
    runs torch's ops on one thread: two workers with a thread per core each, on 2 cores, spent
    their time spinning in each other's thread pools (9.8 min, as long as in one process; 7.6
    to 7.8 with one thread each, on a 2-core Xeon). Subprocesses that tests start keep
    torch's default. The tests that start processes which train (sweeps killed and resumed,
    Ray clusters) are marked ``xdist_group("processes")``: one worker runs them in turn."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        # The processes those tests start train with a thread per core (the lab's
        # threads_per_run) while the other worker keeps a core busy: OpenMP's threads then
        # spin at each barrier waiting for the one that lost its core (a compare run 3-4x
        # slower than alone, measured). Passive waiting yields the core instead (then 2.0-2.8x
        # slower than alone).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
