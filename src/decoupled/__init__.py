"""decoupled: Adam vs AdamW, SGD vs SGDW — exact torch.optim drop-ins, diagnostics and a lab.

>>> from decoupled import AdamW, param_groups
>>> optimizer = AdamW(param_groups(model, weight_decay=0.05), lr=1e-3)
"""

from importlib.metadata import PackageNotFoundError, version

from decoupled.optim import SGD, SGDW, Adam, AdamW, param_groups, with_decoupled_decay
from decoupled.optim.decay import DECAY_SCALES, convert_weight_decay
from decoupled.optim.factory import create_optimizer
from decoupled.rules import normalized_weight_decay, timescale, weight_decay_for_timescale

try:
    __version__ = version("decoupled")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "SGDW",
    "param_groups",
    "with_decoupled_decay",
    "create_optimizer",
    "DECAY_SCALES",
    "convert_weight_decay",
    "normalized_weight_decay",
    "weight_decay_for_timescale",
    "timescale",
    "__version__",
]
