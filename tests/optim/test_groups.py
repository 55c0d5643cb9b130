"""param_groups: what is decayed on a model with every kind of layer."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import decoupled
from decoupled.optim.groups import decay_mask
from tests.helpers import RMSNorm


class Zoo(nn.Module):
    """Linear, Conv, Embedding, LayerNorm, BatchNorm, torch RMSNorm, a custom RMSNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.torch_rms = nn.RMSNorm(8)
        self.custom_rms = RMSNorm(8)
        self.head = nn.Linear(8, 5)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos_embed
        x = self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(self.custom_rms(self.torch_rms(self.ln(x)))).mean(1)


def test_decay_mask_on_every_layer_kind():
    mask = decay_mask(Zoo())
    assert mask == {
        "pos_embed": True,
        "embed.weight": True,
        "conv.weight": True,
        "conv.bias": False,
        "bn.weight": False,
        "bn.bias": False,
        "ln.weight": False,
        "ln.bias": False,
        "torch_rms.weight": False,
        "custom_rms.scale": False,
        "head.weight": True,
        "head.bias": False,
    }  # frozen.* is absent: it does not require grad


def test_embeddings_and_patterns_can_be_excluded():
    mask = decay_mask(Zoo(), exclude_embeddings=True, exclude=["pos_*"])
    assert {n for n, d in mask.items() if d} == {"conv.weight", "head.weight"}


def test_groups_summary_and_log(caplog):
    model = Zoo()
    with caplog.at_level(logging.INFO, logger="decoupled"):
        groups, summary = decoupled.param_groups(model, 0.05, return_summary=True)
    decayed = [model.embed.weight, model.pos_embed, model.conv.weight, model.head.weight]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in decayed}
    assert summary.decay_tensors == 4 and summary.no_decay_tensors == 8
    assert summary.decay_params == sum(p.numel() for p in decayed)
    text = str(summary)
    assert text.startswith("decay: 4 tensors, ") and "; no decay: 8 tensors, " in text
    assert text in caplog.text


def test_groups_drive_an_optimizer_and_only_decay_the_decayed():
    model = Zoo()
    optimizer = decoupled.AdamW(decoupled.param_groups(model, 0.5, verbose=False), lr=0.1)
    ln_before = model.ln.weight.detach().clone()
    head_before = model.head.weight.detach().clone()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # zero gradient: only decay can move a weight
    optimizer.step()
    assert torch.equal(model.ln.weight, ln_before)
    torch.testing.assert_close(model.head.weight, head_before * (1 - 0.1 * 0.5))


def test_every_bias_and_1d_tensor_is_exempt_whatever_its_name():
    """As timm and Hugging Face's Trainer: MultiheadAttention's and LSTM's biases, LayerScale."""

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8))

    model = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2, add_bias_kv=True),
            "rnn": nn.LSTM(8, 8),
            "scale": LayerScale(),
        }
    )
    mask = decay_mask(model)
    assert {n for n, d in mask.items() if d} == {
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
    }
    assert not mask["attn.bias_k"] and not mask["rnn.bias_ih_l0"] and not mask["scale.gamma"]


def test_one_exclude_pattern_may_be_a_string():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert decay_mask(model, exclude="1.*") == decay_mask(model, exclude=["1.*"])
    assert decay_mask(model, exclude="1.*") == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": False,
        "1.bias": False,
    }


@pytest.mark.parametrize("embedding_first", [True, False])
def test_a_tied_weight_is_exempt_if_any_of_its_names_is(embedding_first):
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    modules = [("embed", embedding), ("head", head)]
    model = nn.Sequential(OrderedDict(modules if embedding_first else modules[::-1]))
    assert list(decay_mask(model, exclude_embeddings=True).values()) == [False]
    assert list(decay_mask(model).values()) == [True]
    assert list(decay_mask(model, exclude=["head.*"]).values()) == [False]


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_lambda_norm_leaves_the_no_decay_group_alone(cls):
    """λ_norm replaces λ in the decayed group; the no-decay group (λ = 0) stays undecayed."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = decoupled.param_groups(model, 0.05, verbose=False)
    optimizer = cls(groups, lr=0.1, lambda_norm=0.5, decay_period=100)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decay can move a weight
    optimizer.step()
    weight, *exempt = model.parameters()
    torch.testing.assert_close(weight, before[0] * (1 - 0.5 / 100**0.5))  # η = 1: c = λ
    assert all(torch.equal(p, b) for p, b in zip(exempt, before[1:]))


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_lambda_norm_decays_groups_that_leave_weight_decay_to_the_default(cls):
    """Only a group that sets weight_decay=0 itself opts out: SGDW's default λ is 0 (torch's
    SGD), and SGDW(params, lambda_norm=...) must still decay; so must a group with both."""
    weights = [nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(3)]
    groups = [
        {"params": [weights[0]]},
        {"params": [weights[1]], "weight_decay": 0.0, "lambda_norm": 0.2},
        {"params": [weights[2]], "weight_decay": 0.0},
    ]
    optimizer = cls(groups, lr=0.1, lambda_norm=0.5, decay_period=100)
    assert [g["decay_scale"] for g in optimizer.param_groups] == ["schedule"] * 3
    for w in weights:
        w.grad = torch.zeros_like(w)
    optimizer.step()
    factors = [w[0].item() for w in weights]
    assert factors == pytest.approx([1 - 0.5 / 10, 1 - 0.2 / 10, 1.0], rel=1e-12)


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_a_checkpoint_with_lambda_norm_in_every_group_keeps_the_no_decay_group_undecayed(cls):
    """A checkpoint may hold the optimizer-wide lambda_norm in the no-decay group too; the
    loading optimizer's opt-out stands, as its fused and state_dtype do."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = decoupled.param_groups(model, 0.05, verbose=False)
    optimizer = cls(groups, lr=0.1, lambda_norm=0.5, decay_period=100)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group["lambda_norm"] = 0.5  # the optimizer-wide value, in the no-decay group too
    optimizer.load_state_dict(saved)
    assert [g["lambda_norm"] for g in optimizer.param_groups] == [0.5, None]
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(list(model.parameters())[1:], before[1:]))
    # an optimizer built without lambda_norm takes the checkpoint's, as torch would
    plain = cls(decoupled.param_groups(model, 0.05, verbose=False), lr=0.1)
    plain.load_state_dict(saved)
    assert [g["lambda_norm"] for g in plain.param_groups] == [0.5, 0.5]


def test_tied_weights_are_listed_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    groups = decoupled.param_groups(model, 0.1, verbose=False)
    assert sum(len(g["params"]) for g in groups) == 1
    decoupled.AdamW(groups)  # no "appears in more than one group" error


def test_summary_formats_large_counts():
    model = nn.Linear(2000, 1000)
    summary = decoupled.param_groups(model, 0.1, verbose=False, return_summary=True)[1]
    assert str(summary) == "decay: 1 tensors, 2.0M params; no decay: 1 tensors, 1.0k params"


def test_bad_weight_decay():
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        decoupled.param_groups(nn.Linear(2, 2), -1)
