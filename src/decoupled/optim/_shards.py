"""DTensor parameters (FSDP2's ``fully_shard``) on the fast paths.

The update is elementwise, so each rank steps its own shard: the local tensors
(``to_local()``, which share memory with the DTensors) of θ, g and the state go through the
path the local tensors would take alone — the C++ kernel on the CPU, Triton on CUDA — instead
of the reference loop over DTensors (about ten dispatches through DTensor's sharding
propagation per tensor). Nothing here communicates: ``skip_nonfinite`` reduces its flag over
the mesh before the step (``_base.py``).

One difference from an unsharded run: stochastic rounding of bfloat16 state hashes each
element's index within its shard, so bfloat16 moments round differently (alike in
distribution); float32 state steps exactly as the unsharded tensors would.
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
