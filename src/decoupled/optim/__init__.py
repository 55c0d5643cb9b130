"""Optimizers: Adam (L2) and AdamW (decoupled), SGD and SGDW, decoupled decay for any torch
optimizer (``with_decoupled_decay``), steps inside backward (``step_in_backward``), and the
decay helpers."""

from decoupled.optim._int8 import upgrade_int8_state
from decoupled.optim._kernels import kernel_available
from decoupled.optim.adam import Adam, AdamW, adam_update
from decoupled.optim.decay import DECAY_SCALES, decay_rate
from decoupled.optim.extend import with_decoupled_decay
from decoupled.optim.groups import GroupSummary, decay_mask, is_norm_layer, param_groups
from decoupled.optim.in_backward import BackwardSteps, step_in_backward
from decoupled.optim.sgd import SGD, SGDW, sgd_update

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "SGDW",
    "adam_update",
    "sgd_update",
    "DECAY_SCALES",
    "decay_rate",
    "param_groups",
    "decay_mask",
    "is_norm_layer",
    "GroupSummary",
    "kernel_available",
    "with_decoupled_decay",
    "upgrade_int8_state",
    "step_in_backward",
    "BackwardSteps",
]
