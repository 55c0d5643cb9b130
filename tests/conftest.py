"""Hypothesis profiles for the whole suite, and Ctrl-C reaching the processes tests start.

``default`` draws the same examples on every run (``derandomize``), so a run that lands or is
refused says something about the change and not about the draw. ``explore`` draws new ones:
``python -m pytest --hypothesis-profile=explore`` searches for cases the fixed draw misses;
a failure it finds is pinned with ``@example`` before it is fixed."""

import signal

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
