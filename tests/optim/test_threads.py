"""The C++ kernel's results do not depend on how many threads step them.

``for_each_chunk`` (``csrc/tensor_lists.h``) hands each thread a run of 32K-element chunks
holding an equal share of a list's elements, so the split between threads moves with the
thread count and with the tensors' sizes. Every element's arithmetic, and the bits that round
it, depend on its position alone: the same steps on 1, 2 and 3 threads give the same θ and
state, bit for bit. The other kernel tests run on one thread (``one_thread``), for speed.
"""

from __future__ import annotations

import pytest
import torch

import decoupled

# between and beside tensors of two and three chunks, small ones, so that shares end mid-list
SHAPES = [(3,), (70_000,), (5, 7), (40_000,), (1,), (300, 2), (33_000,)]
CASES = [
    pytest.param(decoupled.AdamW, torch.float32, {}, id="adamw"),
    pytest.param(decoupled.AdamW, torch.float32, {"state_dtype": torch.bfloat16}, id="bf16-state"),
    pytest.param(decoupled.AdamW, torch.float32, {"state_dtype": "int8"}, id="int8-state"),
    pytest.param(decoupled.Adam, torch.bfloat16, {"state_dtype": "int8"}, id="bf16-theta-int8"),
    pytest.param(
        decoupled.AdamW,
        torch.float16,
        {"cautious": True, "state_dtype": torch.bfloat16},
        id="f16-theta-cautious",
    ),
    pytest.param(decoupled.SGDW, torch.float32, {"momentum": 0.9}, id="sgdw"),
    pytest.param(decoupled.SGD, torch.bfloat16, {"momentum": 0.9}, id="sgd-bf16-theta"),
]


def stepped(cls, dtype, options, threads: int, steps: int = 4):
    """(θ, state) after `steps` steps of fixed gradients on `threads` threads."""
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES
    ]
    optimizer = cls(params, lr=1e-2, weight_decay=0.1, **options)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            optimizer.step()
    finally:
        torch.set_num_threads(previous)
    return [p.detach().clone() for p in params], optimizer.state_dict()["state"]


@pytest.mark.parametrize("cls,dtype,options", CASES)
def test_the_same_steps_on_one_two_and_three_threads_are_bit_identical(
    cls, dtype, options, path_log
):
    family = "sgd" if issubclass(cls, decoupled.SGD) else "adam"  # SGDW is an SGD
    params_one, state_one = stepped(cls, dtype, options, threads=1)
    assert set(path_log) == {f"kernel_{family}_update"}  # the kernel took every step
    for threads in (2, 3):
        params, state = stepped(cls, dtype, options, threads)
        assert all(torch.equal(p, q) for p, q in zip(params, params_one, strict=True)), threads
        for index, entries in state_one.items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    assert torch.equal(state[index][key], value), (threads, index, key)
