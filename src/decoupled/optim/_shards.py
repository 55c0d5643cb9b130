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
coordinate along the mesh dimensions the parameter is sharded over; replicas share it, so
they stay identical); a list mixing meshes or placements is stepped in runs of one layout,
each moved by its own index. Distinct while an optimizer has fewer than 2²⁰ parameters and a
tensor fewer than 2¹² shards.
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
    references, found_inf as they are), once per run of consecutive parameters that share one
    mesh and placement (``_runs``), each run's rounding positions moved by its shard index;
    momentum buffers it creates (SGD's first step) are wrapped back into DTensors sharded like
    their parameter, so that the state stays checkpointable by
    ``torch.distributed.checkpoint``."""

    def sharded(*lists: list, **options):
        options = dict(options)
        first = options.pop("first_position", 0)
        if options.get("references") is not None:
            options["references"] = local(options["references"])
        local_lists = [local(values) for values in lists]
        count = len(params)

        for start, stop in _runs(params):
            run_lists = [_part(values, count, start, stop) for values in local_lists]
            run_options = {name: _part(v, count, start, stop) for name, v in options.items()}
            shift = _shard_index(params[start]) << 20
            update(*run_lists, first_position=first + start + shift, **run_options)
            for values, run in zip(local_lists, run_lists):
                if run is not values:  # entries the update set (SGD's new buffers)
                    values[start:stop] = run
        for values, local_values in zip(lists, local_lists):
            for index, (value, new) in enumerate(zip(values, local_values)):
                if value is None and new is not None:
                    values[index] = _like_param(new, params[index])

    return update_wrapper(sharded, update)


def _runs(params: list) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive parameters on one mesh with one placement:
    FSDP2's ``fully_shard`` gives one run; a list mixing sharded and replicated tensors is
    stepped run by run, so that each run's positions can be moved by its own shard index
    (replicas keep 0 and stay identical on every rank)."""
    runs, start = [], 0
    for index in range(1, len(params) + 1):
        if index == len(params) or _layout(params[index]) != _layout(params[start]):
            runs.append((start, index))
            start = index
    return runs


def _part(values, count: int, start: int, stop: int):
    """A list with one entry per parameter (``count``): its entries ``[start, stop)``; any other
    value as it is."""
    return values[start:stop] if isinstance(values, list) and len(values) == count else values


def _layout(param) -> tuple:
    return param.device_mesh, tuple(param.placements)


def _like_param(shard: Tensor, param) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
        stride=param.stride(),
    )  # fmt: skip


def _shard_index(param) -> int:
    """This rank's shard of ``param`` among its tensor's shards: its coordinate along the
    mesh dimensions where ``param`` is sharded (0 when it is replicated over all of them)."""
    mesh, coordinate = param.device_mesh, param.device_mesh.get_coordinate()
    index = 0
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return index
