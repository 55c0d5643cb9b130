"""Which weight tensors are scale-invariant: the loss does not change when they are scaled.

Such tensors — weights feeding a normalization layer — have gradients orthogonal to
themselves, and weight decay sets their norm and so their effective learning rate (van
Laarhoven 2017, arXiv 1706.05350); the equilibrium predictions of ``theory.py`` apply to them.

Two ways to find them:

* :func:`structurally_scale_invariant` reads the model: a Linear/Conv weight whose layer is
  followed, in registration order and through positively homogeneous modules only (ReLU,
  pooling, dropout, flatten), by a normalization layer. BatchNorm and InstanceNorm subtract a
  per-channel mean, which also removes the layer's bias when nothing in between changes a
  per-channel constant (pooling, flatten, identity; not ReLU or dropout), so the weight is
  then invariant with a bias too; otherwise, and for LayerNorm, GroupNorm and RMSNorm, which
  keep a per-feature bias, the layer must have none. LocalResponseNorm, despite its name, is
  not a scale-invariant normalization. A heuristic: it assumes ``forward`` calls modules in
  the order they were registered (as ``nn.Sequential`` does), and that BatchNorm uses batch
  statistics (training).
* :func:`scale_invariant_tensors` checks numerically, on a batch, that scaling a tensor by 2
  leaves the loss unchanged (up to the normalization's ε and rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from decoupled.optim.groups import is_norm_layer

_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
# Modules with f(a·x) = a·f(x) for a > 0 and f(x + c) = f(x) + c for a per-channel constant
# c: a bias passes them unchanged, so a per-channel mean subtraction after them cancels it.
_BIAS_TRANSPARENT = (
    nn.Identity,
    nn.Flatten,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
# Modules with f(a·x) = a·f(x) for a > 0: a normalization after them still sees scaled inputs.
_HOMOGENEOUS = (*_BIAS_TRANSPARENT, nn.ReLU, nn.LeakyReLU, nn.Dropout)
# Normalizations whose per-channel mean subtraction also cancels the preceding layer's bias.
_CHANNEL_MEAN_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Named like normalizations, but not invariant to the scale of their input.
_NOT_SCALE_INVARIANT = (nn.LocalResponseNorm, nn.CrossMapLRN2d)


def structurally_scale_invariant(model: nn.Module) -> set[str]:
    """Names (``model.named_parameters()`` style) of weights that feed a normalization layer.

    See the module docstring for the rule and its assumptions.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    invariant = set()
    for position, (name, module) in enumerate(leaves):
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        between, norm = [], None
        for _, candidate in leaves[position + 1 :]:
            if not isinstance(candidate, _HOMOGENEOUS):
                norm = candidate
                break
            between.append(candidate)
        if norm is None or not is_norm_layer(norm) or isinstance(norm, _NOT_SCALE_INVARIANT):
            continue
        bias_cancelled = isinstance(norm, _CHANNEL_MEAN_NORMS) and all(
            _passes_bias(m) for m in between
        )
        if module.bias is None or bias_cancelled:
            invariant.add(f"{name}.weight" if name else "weight")
    return invariant


def _passes_bias(module: nn.Module) -> bool:
    """Whether a per-channel constant added before ``module`` comes out of it unchanged. An
    average pool with zero padding counted in its divisor (PyTorch's default,
    ``count_include_pad=True``), or with a ``divisor_override``, scales it down at the
    borders (to 6/9 in a 3×3 corner window), so the constant no longer is one."""
    if not isinstance(module, _BIAS_TRANSPARENT):
        return False
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        padded = any(pad != 0 for pad in padding) and getattr(module, "count_include_pad", True)
        return not padded and getattr(module, "divisor_override", None) is None
    return True


@torch.no_grad()
def scale_invariant_tensors(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    factor: float = 2.0,
    rtol: float = 1e-3,
    seed: int = 0,
) -> set[str]:
    """Names of parameters θ for which ``loss(θ·factor) ≈ loss(θ)`` on ``batch``.

    ``loss_fn(model, batch)`` returns a scalar (``task.loss`` has this form). Each forward
    pass runs on a copy of the model with the same random seed (same dropout masks), so the
    model itself — weights and BatchNorm running statistics — is left untouched. A tensor
    counts as invariant when the loss changes by at most ``rtol`` relative (the
    normalization's ε makes invariance inexact; float32 rounding adds ~1e-7). All-zero
    tensors (e.g. freshly initialized biases) are left out: scaling them changes nothing.
    """
    probe = copy.deepcopy(model)
    probe.train(model.training)
    snapshot = copy.deepcopy(probe.state_dict())

    def loss_now() -> float:
        probe.load_state_dict(snapshot)  # undo running-statistics updates of earlier passes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return float(loss_fn(probe, batch))

    reference = loss_now()
    invariant = set()
    for name, _ in probe.named_parameters():
        if not snapshot[name].any():
            continue
        original = snapshot[name].clone()
        snapshot[name].mul_(factor)
        changed = loss_now()
        snapshot[name].copy_(original)
        if abs(changed - reference) <= rtol * max(abs(reference), 1e-12):
            invariant.add(name)
    return invariant
