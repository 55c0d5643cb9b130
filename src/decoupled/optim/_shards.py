"""DTensor parameters (FSDP2's ``fully_shard``) on the fast paths.

The update is elementwise, so each rank steps its own shard: the local tensors
(``to_local()``, which share memory with the DTensors) of θ, g and the state go through the
path the local tensors would take alone — the C++ kernel on the CPU, Triton on CUDA — instead
of the reference loop over DTensors (about ten dispatches through DTensor's sharding
propagation per tensor). Nothing here communicates: ``skip_nonfinite`` reduces its flag over
the mesh before the step (``_base.py``).

One difference from an unsharded run: stochastic rounding (bfloat16 and int8 moments,
compensated θ) hashes each element's index within its shard, so the moments round differently
(alike in distribution); float32 state steps exactly as the unsharded tensors would. So that
the shards of one tensor on different ranks do not draw the same bits, the tensor positions
that key the rounding are moved by ``shard_index · 2²⁰`` (``_shard_index``: this rank's
coordinate along the mesh dimensions the parameters are sharded over; replicas share it, so
they stay identical), when all tensors of the update share one mesh and placement (else
not moved). Distinct while an optimizer has fewer than 2²⁰ parameters and a tensor fewer than
2¹² shards.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import update_wrapper

from torch import Tensor


def is_sharded(tensors: list) -> bool:
    """True when every tensor is a DTensor (duck-typed: torch.distributed may be absent)."""
    return bool(tensors) and all(
        hasattr(t, "to_local") and hasattr(t, "placements") for t in tensors
    )


def local(tensors: list | None) -> list | None:
    """The local shards of a list of DTensors (None entries and plain tensors kept)."""
    if tensors is None:
        return None
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def on_local_shards(update: Callable, params: list[Tensor]) -> Callable:
    """``update`` called with every list of DTensors replaced by their local shards (and lr,
    references, found_inf as they are); momentum buffers it creates (SGD's first step) are
    wrapped back into DTensors sharded like their parameter, so that the state stays
    checkpointable by ``torch.distributed.checkpoint``."""

    def sharded(*lists: list, **options):
        options = dict(options)
        options["first_position"] = options.get("first_position", 0) + _shard_shift(params)
        if options.get("references") is not None:
            options["references"] = local(options["references"])
        local_lists = [local(values) for values in lists]
        update(*local_lists, **options)
        for values, local_values in zip(lists, local_lists):
            for index, (value, new) in enumerate(zip(values, local_values)):
                if value is None and new is not None:
                    values[index] = _like_param(new, params[index])

    return update_wrapper(sharded, update)


def _like_param(shard: Tensor, param) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
        stride=param.stride(),
    )  # fmt: skip


def _shard_shift(params: list) -> int:
    """``shard_index · 2²⁰`` when every parameter lies on one mesh with one placement (FSDP2's
    ``fully_shard``); else 0: a list mixing replicated and sharded tensors keeps the ranks'
    keys alike, since a per-list shift would make its replicas round apart."""
    layout = (params[0].device_mesh, tuple(params[0].placements))
    if any((p.device_mesh, tuple(p.placements)) != layout for p in params[1:]):
        return 0
    return _shard_index(params[0]) << 20


def _shard_index(param) -> int:
    """This rank's shard of ``param`` among its tensor's shards: its coordinate along the
    mesh dimensions where ``param`` is sharded (0 when it is replicated over all of them)."""
    mesh, coordinate = param.device_mesh, param.device_mesh.get_coordinate()
    index = 0
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return index
