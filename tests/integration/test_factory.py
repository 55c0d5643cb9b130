"""decoupled.create_optimizer: the timm-style factory (name -> class, param_groups, layer-wise
lr decay)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decoupled
from decoupled.optim.factory import layer_depths


class _Blocks(nn.Module):
    """A ViT-shaped toy: stem (embedding), ``blocks.N``, final norm and head."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)


def _by_param(optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "sgdw"])
def test_picks_the_registry_class_with_param_groups_split(name):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = decoupled.create_optimizer(model, name, lr=0.01, weight_decay=0.1)
    assert type(optimizer) is {"adam": decoupled.Adam, "adamw": decoupled.AdamW}.get(
        name, {"sgd": decoupled.SGD, "sgdw": decoupled.SGDW}.get(name)
    )
    expected = decoupled.param_groups(model, 0.1, verbose=False)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == [
        [id(p) for p in g["params"]] for g in expected
    ]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.01 and g["lr_scale"] == 1.0 for g in optimizer.param_groups)


def test_defaults_are_the_class_defaults_and_options_pass_through():
    model = nn.Linear(3, 2)
    optimizer = decoupled.create_optimizer(model, "adamw", betas=(0.8, 0.9))
    assert optimizer.param_groups[0]["weight_decay"] == 1e-2  # AdamW's own default
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    momentum = decoupled.create_optimizer(model, "sgd", lr=0.1, momentum=0.9)
    assert momentum.param_groups[0]["momentum"] == 0.9
    assert momentum.param_groups[0]["weight_decay"] == 0.0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Invalid optimizer value: 'adan' \(choose from adam, "
                       r"adamw, sgd, sgdw, adamw-cautious, sgdw-cautious\)"):  # fmt: skip
        decoupled.create_optimizer(nn.Linear(2, 2), "adan", lr=1e-3)


def test_layer_decay_on_blocks_scales_lr_by_depth_from_top():
    model = _Blocks(depth=3)
    optimizer = decoupled.create_optimizer(
        model, "adamw", lr=1.0, weight_decay=0.1, layer_decay=0.5
    )
    groups = _by_param(optimizer)
    # 3 blocks: stem depth 4, blocks.0..2 depths 3..1, norm and head depth 0 (timm's rule)
    expected = {"embed.weight": 4, "blocks.0.1.weight": 3, "blocks.2.1.weight": 1,
                "blocks.1.0.bias": 2, "norm.weight": 0, "head.weight": 0}  # fmt: skip
    named = dict(model.named_parameters())
    mask = decoupled.optim.groups.decay_mask(model)
    assert mask["blocks.1.0.bias"] is False and mask["embed.weight"] is True
    for param_name, depth in expected.items():
        group = groups[id(named[param_name])]
        assert group["layer_depth"] == depth
        assert group["lr"] == pytest.approx(0.5**depth)
        assert group["weight_decay"] == (0.1 if mask[param_name] else 0.0)
    # one group per (layer, decayed?): every parameter exactly once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_layer_decay_on_sequential_and_hugging_face_names():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 1))
    assert layer_depths(model) == {
        "0.weight": 2, "0.bias": 2, "2.weight": 1, "2.bias": 1, "3.weight": 0, "3.bias": 0,
    }  # fmt: skip

    class Bert(nn.Module):  # the names of BertModel: embeddings, encoder.layer.N, pooler
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Embedding(5, 4)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.pooler = nn.Linear(4, 4)

    assert layer_depths(Bert()) == {
        "embeddings.weight": 3,
        "encoder.layer.0.weight": 2, "encoder.layer.0.bias": 2,
        "encoder.layer.1.weight": 1, "encoder.layer.1.bias": 1,
        "pooler.weight": 0, "pooler.bias": 0,
    }  # fmt: skip


def test_layer_decay_trains_like_separate_lrs():
    """A layer-decayed optimizer steps exactly like one built from the same groups by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    reference.load_state_dict(model.state_dict())
    ours = decoupled.create_optimizer(model, "adamw", lr=0.1, weight_decay=0.1, layer_decay=0.5)
    by_hand = decoupled.AdamW(
        [
            {"params": [reference[0].weight], "lr": 0.05},
            {"params": [reference[0].bias], "lr": 0.05, "weight_decay": 0.0},
            {"params": [reference[1].weight], "lr": 0.1},
            {"params": [reference[1].bias], "lr": 0.1, "weight_decay": 0.0},
        ],
        lr=0.1,
        weight_decay=0.1,
    )
    inputs = torch.randn(8, 3)
    for net, optimizer in ((model, ours), (reference, by_hand)):
        for _ in range(3):
            optimizer.zero_grad()
            net(inputs).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "layer_decay", "message"),
    [
        (nn.Sequential(nn.Linear(2, 2)), 1.5, r"Invalid layer_decay value: 1.5 \(must be in"),
        (nn.Sequential(nn.Linear(2, 2)), 0.0, r"Invalid layer_decay value: 0.0 "),
        (nn.Linear(2, 2), 0.8, r"layer_decay needs layers to decay over and found none in Linear"),
    ],
)
def test_layer_decay_errors(model, layer_decay, message):
    with pytest.raises(ValueError, match=message):
        decoupled.create_optimizer(model, "adamw", lr=1e-3, layer_decay=layer_decay)
