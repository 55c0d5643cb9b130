"""Hypothesis profiles for the whole suite.

``default`` draws the same examples on every run (``derandomize``), so a run that lands or is
refused says something about the change and not about the draw. ``explore`` draws new ones:
``python -m pytest --hypothesis-profile=explore`` searches for cases the fixed draw misses;
a failure it finds is pinned with ``@example`` before it is fixed."""

from hypothesis import settings

settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")
