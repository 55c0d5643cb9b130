"""create_optimizer(): one call from a model and an optimizer's name to a ready optimizer, in
the manner of timm's ``create_optimizer_v2`` (name, lr, weight_decay, layer_decay, options).

    optimizer = decoupled.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)

The parameters are split by :func:`~decoupled.optim.groups.param_groups`'s rule (biases,
1-D tensors and normalization layers are not decayed). With ``layer_decay`` the groups are
further split by layer, and each layer's lr is scaled by ``layer_decay ** depth_from_top``
(layer-wise lr decay: Clark et al. 2020, ELECTRA, appendix A; BEiT, Bao et al. 2022; timm's
``param_groups_layer_decay``).

Layers, in the order of ``model.named_parameters()``:

* **numbered blocks**: parameters whose name contains ``blocks.N.``, ``layers.N.``,
  ``layer.N.`` (Hugging Face BERT's ``encoder.layer.N``) or ``h.N.`` (GPT-2) belong to block N.
  Parameters before the first block's (embeddings, a ViT's ``cls_token``/``pos_embed``/patch
  embedding) form the stem, the bottom layer; every other parameter (final norm, pooler, head)
  forms the top layer. So with L blocks there are L + 2 layers: stem depth L + 1, block N
  depth L − N, the top depth 0 (its lr is ``lr`` itself), as in timm;
* **nn.Sequential**: each child that holds parameters is one layer, the last one at depth 0.

A model that fits neither is refused when ``layer_decay`` is given (pass your own groups to
the optimizer class instead).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

from decoupled.optim.groups import decay_mask
from decoupled.optim.registry import get_optimizer_info

__all__ = ["create_optimizer", "layer_depths"]

#: a numbered block in a parameter's qualified name; group 1 is the block's index
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")


def create_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    layer_decay: float | None = None,
    exclude_embeddings: bool = False,
    exclude=(),
    **options: Any,
):
    """The optimizer ``name`` (a key of ``decoupled.optim.registry``: adam, adamw, sgd, sgdw)
    over ``model``'s parameters, split into decayed and not decayed groups.

    Args:
        model: the module to optimize.
        name: the optimizer's registry name; anything else raises
            ``ValueError: Invalid optimizer value: 'adan' (choose from adam, adamw, sgd, sgdw)``.
        lr: peak learning rate γ (default: the class's own default).
        weight_decay: λ of the decayed tensors, in the class's units (default: the class's own
            default: 0 for Adam and SGD, 1e-2 for AdamW and SGDW).
        layer_decay: in (0, 1]; scale each layer's lr by ``layer_decay ** depth_from_top``
            (module docstring). Decoupled decay with the default ``decay_scale="lr"`` removes
            γλ per step, so a layer's decay shrinks with its lr, as in timm.
        exclude_embeddings, exclude: passed to :func:`~decoupled.optim.groups.decay_mask`.
        options: the class's other arguments (``betas``, ``momentum``, ``decay_scale``, ...).

    Each group carries ``lr_scale`` (1.0 without ``layer_decay``) and, with it,
    ``layer_depth``: extra keys that torch optimizers keep and ignore.
    """
    info = get_optimizer_info(name)
    defaults = inspect.signature(info.cls).parameters
    lr = defaults["lr"].default if lr is None else lr
    weight_decay = defaults["weight_decay"].default if weight_decay is None else weight_decay
    mask = decay_mask(model, exclude_embeddings=exclude_embeddings, exclude=exclude)
    named = [(n, p) for n, p in model.named_parameters() if n in mask]
    if layer_decay is None:
        depths = {n: None for n, _ in named}
    else:
        if isinstance(layer_decay, bool) or not 0 < layer_decay <= 1:
            raise ValueError(f"Invalid layer_decay value: {layer_decay!r} (must be in (0, 1])")
        depths = layer_depths(model)
    groups: dict[tuple, dict] = {}
    for param_name, param in named:
        depth, decayed = depths[param_name], mask[param_name]
        scale = 1.0 if depth is None else layer_decay**depth
        key = (depth, decayed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr": lr * scale,
                "lr_scale": scale,
                **({} if depth is None else {"layer_depth": depth}),
            }
        groups[key]["params"].append(param)
    return info.cls(list(groups.values()), lr=lr, weight_decay=weight_decay, **options)


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each trainable parameter's layer depth from the top (0 = the top layer), by the rule
    of the module docstring; ``ValueError`` for a model it finds no layers in."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if blocks:
        count = max(blocks.values()) + 1
        first_block = next(i for i, n in enumerate(names) if n in blocks)
        depths = {}
        for index, param_name in enumerate(names):
            if param_name in blocks:
                depths[param_name] = count - blocks[param_name]
            else:  # the stem below the first block, the top above it
                depths[param_name] = count + 1 if index < first_block else 0
        return depths
    if isinstance(model, nn.Sequential):
        children = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
        return {n: len(children) - 1 - children.index(n.split(".", 1)[0]) for n in names}
    raise ValueError(
        f"layer_decay needs layers to decay over and found none in {type(model).__name__}: "
        "use an nn.Sequential or name the layers blocks.N / layers.N / layer.N / h.N"
    )
