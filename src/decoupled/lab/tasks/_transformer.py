"""A pre-LN Transformer block shared by the `vit` and `charlm` tasks.

Pre-LN (normalize before attention and MLP, add the residual after) as in GPT-2 and
nanoGPT's ``Block`` (Xiong et al., "On Layer Normalization in the Transformer Architecture",
ICML 2020, arXiv 2002.04745): it trains stably without a warm-up, which the lab's runner does
not promise. Attention is written out (not ``nn.MultiheadAttention``) so that the projections
are plain ``nn.Linear`` weights that ``param_groups`` decays, and so that one flag makes it
causal.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, arXiv 1706.03762, section 3.2)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"Invalid heads value: {heads} (must divide dim {dim})")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        # (batch, length, 3·dim) -> three (batch, heads, length, dim/heads) tensors
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); the MLP is GELU with a 4× hidden width."""

    def __init__(self, dim: int, heads: int, causal: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))
