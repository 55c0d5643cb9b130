"""Sparse gradients (``nn.Embedding(sparse=True)``): SGD and SGDW take them as torch.optim.SGD
does, through the reference loop (the C++ kernel refuses them); Adam and AdamW refuse them
(``test_errors.py``)."""

from __future__ import annotations

import pytest
import torch

import decoupled
from tests.optim.optim_db import INFO, cases

# every path of the entries that take sparse gradients (the kernel refuses them: reference)
SPARSE_CASES = cases(inputs="sparse_inputs", entries=lambda info: info.sparse_inputs)
SGD_PATHS = [pytest.param(path, id=path.name) for path in INFO[decoupled.SGD].paths]


@pytest.mark.parametrize("info,path,inp", SPARSE_CASES)
def test_sgd_takes_sparse_gradients_as_torch(info, path, inp):
    """nn.Embedding(sparse=True): same parameters and (sparse) momentum buffers as
    torch.optim.SGD."""
    embeddings = [torch.nn.Embedding(50, 4, sparse=True) for _ in range(2)]
    embeddings[1].load_state_dict(embeddings[0].state_dict())
    ours = info.cls(embeddings[0].parameters(), **path.kwargs, **inp.kwargs)
    theirs = info.torch_cls(embeddings[1].parameters(), **inp.kwargs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        rows = torch.randint(0, 50, (8,), generator=generator)  # repeated rows too
        weights = torch.randn(8, 4, generator=generator)
        for embedding, optimizer in zip(embeddings, (ours, theirs)):
            optimizer.zero_grad()
            (embedding(rows) * weights).sum().backward()
            optimizer.step()
    assert torch.equal(embeddings[0].weight, embeddings[1].weight)
    if inp.kwargs.get("momentum"):
        buffers = [o.state[e.weight]["momentum_buffer"] for o, e in zip((ours, theirs), embeddings)]
        assert buffers[0].is_sparse and torch.equal(buffers[0].to_dense(), buffers[1].to_dense())


def test_sgdw_decays_every_row_with_sparse_gradients():
    """Decoupled decay does not pass through the gradient: rows without one shrink too."""
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    before = embedding.weight.detach().clone()
    optimizer = decoupled.SGDW(embedding.parameters(), lr=0.1, weight_decay=0.5)
    embedding(torch.tensor([0])).sum().backward()
    optimizer.step()
    assert torch.equal(embedding.weight[1:], before[1:] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("path", SGD_PATHS)
def test_sgd_refuses_sparse_gradients_with_l2_decay_before_changing_anything(path):
    """As torch.optim.SGD (whose g + λθ fails on a sparse g), but saying why."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    before = embedding.weight.detach().clone()
    optimizer = decoupled.SGD(embedding.parameters(), lr=0.1, weight_decay=0.1, **path.kwargs)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients with weight_decay=0.1.*SGDW"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)
    with pytest.raises(RuntimeError):  # torch's own message: add(sparse, dense) not supported
        torch.optim.SGD(embedding.parameters(), lr=0.1, weight_decay=0.1).step()


def test_a_refused_sparse_l2_group_leaves_the_groups_before_it_unchanged():
    dense, embedding = torch.nn.Linear(2, 2), torch.nn.Embedding(10, 3, sparse=True)
    optimizer = decoupled.SGD(
        [{"params": dense.parameters(), "weight_decay": 0.0},
         {"params": embedding.parameters(), "weight_decay": 0.1}], lr=0.1, momentum=0.9,
    )  # fmt: skip
    before = [p.detach().clone() for p in (*dense.parameters(), embedding.weight)]
    (dense(torch.ones(2)).sum() + embedding(torch.tensor([1])).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse gradients with weight_decay=0.1"):
        optimizer.step()
    after = (*dense.parameters(), embedding.weight)
    assert all(torch.equal(p, b) for p, b in zip(after, before)) and not optimizer.state


def test_skip_nonfinite_reads_sparse_gradients():
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    before = embedding.weight.detach().clone()
    optimizer = decoupled.SGD(embedding.parameters(), lr=0.1, skip_nonfinite=True)
    (embedding(torch.tensor([1, 3])) * torch.tensor([[1.0], [float("nan")]])).sum().backward()
    optimizer.step()
    assert optimizer.skipped_steps == 1 and torch.equal(embedding.weight, before)
