"""Diagnostics: measure what weight decay actually does, per element and per layer, and hold it
against theory (SCIENCE.md §4, §5, §8).

* :class:`DecayMonitor` — attach to an optimizer; records effective decay rates, norms and
  angular updates per tensor into a :class:`DecayTable` (CSV, or the lab's results.db through
  ``ResultStore.save_decay_table``).
* :func:`element_decay_rates` — the effective decay rate of every element after a step.
* :func:`structurally_scale_invariant`, :func:`scale_invariant_tensors` — which tensors the
  loss does not care about the scale of.
* ``theory`` — equilibrium predictions (angular update, norm) and :func:`angle_between`.
* ``fixed_points`` — where Adam + L2, SGD + L2 and AdamW converge on a convex problem.

matplotlib is needed only to draw: ``plots`` (inspect) and ``fixed_points_plot``, both through
``decoupled.plotting``, the package's one pyplot entry point.
"""

from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.diagnostics.rates import DecayKind, decay_kind, element_decay_rates, spearman
from decoupled.diagnostics.scale_invariance import (
    scale_invariant_tensors,
    structurally_scale_invariant,
)
from decoupled.diagnostics.table import COLUMNS, DecayRecord, DecayTable
from decoupled.diagnostics.theory import (
    adamw_angular_update,
    adamw_equilibrium_norm,
    angle_between,
    sgd_l2_angular_update,
    sgdw_angular_update,
)

__all__ = [
    "COLUMNS",
    "DecayKind",
    "DecayMonitor",
    "DecayRecord",
    "DecayTable",
    "adamw_angular_update",
    "adamw_equilibrium_norm",
    "angle_between",
    "decay_kind",
    "element_decay_rates",
    "scale_invariant_tensors",
    "sgd_l2_angular_update",
    "sgdw_angular_update",
    "spearman",
    "structurally_scale_invariant",
]
