"""The package's one entry point to matplotlib: every figure (``decoupled.diagnostics.plots``,
``diagnostics/fixed_points_plot.py``, the lab's report figures in ``lab/figures.py``) gets
pyplot from :func:`pyplot` and writes itself with :func:`save_figure`.

matplotlib is imported on the first call, not with the package, so that training and the
command line work without it; the file-only Agg backend needs no display. Optimizer colours
are data in ``decoupled.optim.registry`` (``COLORS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int, **options: Any) -> Path:
    """Write ``figure`` to ``path`` at ``dpi`` (``options`` go to ``savefig``) and close it."""
    figure.savefig(path, dpi=dpi, **options)
    pyplot().close(figure)
    return path
