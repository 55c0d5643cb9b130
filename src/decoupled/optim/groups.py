"""param_groups(): which tensors are decayed, returned as torch parameter groups.

The rule (as in timm's ``param_groups_weight_decay`` and Hugging Face's Trainer, which
exempt 1-D tensors and biases): decay the weights of linear, convolution and attention
projections; do not decay biases (any parameter with "bias" in its name, such as
MultiheadAttention's ``in_proj_bias`` or an LSTM's ``bias_ih_l0``), other 1-D tensors
(LayerScale gains, custom norms' scales), normalization layers' parameters, and optionally
embeddings. The mask has one meaning everywhere: True = decay.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from decoupled.optim._base import check_weight_decay

__all__ = ["param_groups", "decay_mask", "GroupSummary"]

logger = logging.getLogger("decoupled")

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's normalization layers and any module whose class name ends in 'Norm'."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _format_count(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return str(count)


@dataclass(frozen=True)
class GroupSummary:
    """What param_groups decided: counts of tensors and of scalar parameters."""

    decay_tensors: int
    decay_params: int
    no_decay_tensors: int
    no_decay_params: int
    no_decay_names: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"decay: {self.decay_tensors} tensors, {_format_count(self.decay_params)} params; "
            f"no decay: {self.no_decay_tensors} tensors, "
            f"{_format_count(self.no_decay_params)} params"
        )


def _exempt(module: nn.Module, param_name: str, param, exclude_embeddings: bool) -> bool:
    """Whether one (module, local name) alias of a parameter keeps it out of the decay."""
    return (
        "bias" in param_name
        or param.ndim <= 1
        or is_norm_layer(module)
        or (exclude_embeddings and isinstance(module, (nn.Embedding, nn.EmbeddingBag)))
    )


def _classify(model, exclude_embeddings, exclude):
    """(qualified name, parameter, decay?) for each trainable parameter, shared ones once.

    A shared (tied) parameter is named by its first alias and exempt if any alias is (e.g.
    an embedding tied to the output layer, with ``exclude_embeddings``), whatever the order
    in which the modules were registered.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)  # one pattern, not its characters
    patterns = tuple(exclude)
    names: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    exempt: dict[int, bool] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            key = id(param)
            names.setdefault(key, name)
            params[key] = param
            exempt[key] = exempt.get(key, False) or (
                _exempt(module, param_name, param, exclude_embeddings)
                or any(fnmatch.fnmatchcase(name, p) for p in patterns)
            )
    for key, name in names.items():
        yield name, params[key], not exempt[key]


def decay_mask(
    model: nn.Module,
    *,
    exclude_embeddings: bool = False,
    exclude: Iterable[str] = (),
) -> dict[str, bool]:
    """Map each trainable parameter's qualified name to True (decay) or False (no decay).

    Not decayed: biases (any parameter with "bias" in its name), every 1-D tensor, every
    parameter of a normalization layer (see :func:`is_norm_layer`), embeddings if
    ``exclude_embeddings``, and names that match any glob pattern in ``exclude`` (e.g.
    ``"*.pos_embed"``, ``"cls_token"``; one pattern may be given as a string).
    Parameters with ``requires_grad=False`` are left out of the mapping.
    """
    return {name: decay for name, _, decay in _classify(model, exclude_embeddings, exclude)}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_embeddings: bool = False,
    exclude: Iterable[str] = (),
    verbose: bool = True,
    return_summary: bool = False,
):
    """Two torch parameter groups: decayed (``weight_decay``) and not decayed (0.0).

    Args:
        model: the module whose parameters to split.
        weight_decay: λ for the decayed group, in the optimizer's units.
        exclude_embeddings: also exempt ``nn.Embedding``/``EmbeddingBag`` weights.
        exclude: extra glob patterns on qualified names (``fnmatch``), exempted from decay.
        verbose: log the one-line summary (logger ``"decoupled"``, level INFO).
        return_summary: return ``(groups, GroupSummary)`` instead of ``groups``.

    Parameters that never receive a gradient are never touched by any optimizer, decayed
    group or not: torch.optim (and ``decoupled``) skip tensors whose ``.grad`` is None.
    """
    check_weight_decay(weight_decay)
    classified = list(_classify(model, exclude_embeddings, exclude))
    decay = [p for _, p, d in classified if d]
    no_decay = [p for _, p, d in classified if not d]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # an empty group would only clutter the list
    summary = GroupSummary(
        decay_tensors=len(decay),
        decay_params=sum(p.numel() for p in decay),
        no_decay_tensors=len(no_decay),
        no_decay_params=sum(p.numel() for p in no_decay),
        no_decay_names=tuple(n for n, _, d in classified if not d),
    )
    if verbose:
        logger.info("%s", summary)
    return (groups, summary) if return_summary else groups
