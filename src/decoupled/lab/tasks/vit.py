"""ViT: a small Vision Transformer on the 8×8 digits (the `digits` task's data and split).

The architecture follows Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021,
arXiv 2010.11929), scaled down: the image is cut into 2×2 patches (16 tokens of 4 pixels),
each patch is embedded linearly, a learned class token and learned position embeddings are
added, two pre-LN Transformer blocks follow, and the class token's final LayerNorm output is
classified. Transformers are where AdamW is the standard choice, which makes this the task
to contrast with the CNNs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from decoupled.lab.tasks._transformer import Block
from decoupled.lab.tasks.base import Hyperparameters
from decoupled.lab.tasks.digits import Digits


class TinyViT(nn.Module):
    """Patch embedding → [class token; patches] + positions → 2 pre-LN blocks → LN → linear."""

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        classes: int = 10,
    ):
        super().__init__()
        self.patch_size = patch_size
        patches = (image_size // patch_size) ** 2
        self.patch_embedding = nn.Linear(patch_size * patch_size, dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        # std 0.02 as in ViT's and GPT-2's reference code: small next to the patch embeddings
        self.position_embedding = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def patchify(self, images: Tensor) -> Tensor:
        """(batch, H, W) -> (batch, patches, patch_size²), patches in row-major order."""
        p = self.patch_size
        batch, height, width = images.shape
        patches = images.reshape(batch, height // p, p, width // p, p).transpose(2, 3)
        return patches.reshape(batch, (height // p) * (width // p), p * p)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch_embedding(self.patchify(images))
        class_token = self.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([class_token, tokens], dim=1) + self.position_embedding
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class ViT(Digits):
    """8×8 digits (1347 train / 450 test), 2-block ViT (dim 64, 4 heads); metric: test error.

    Budget: 1500 steps of batch 64. How the defaults were chosen: docs/TUNING.md (vit). The
    class token and position embeddings are ``nn.Parameter`` tensors outside any Linear/Norm
    module, so ``param_groups`` decays them like weights.
    """

    name = "vit"
    description = "scikit-learn 8×8 digits, tiny Vision Transformer (2×2 patches, 2 pre-LN blocks)"
    defaults = {
        "adam": Hyperparameters(lr=3e-3, weight_decay=1e-4),
        "adamw": Hyperparameters(lr=3e-3, weight_decay=5e-2),
        "sgd": Hyperparameters(lr=3e-2, weight_decay=5e-4, momentum=0.9),
        "sgdw": Hyperparameters(lr=3e-2, weight_decay=5e-3, momentum=0.9),
    }

    def build_model(self) -> nn.Module:
        return TinyViT()
