"""Multi-head self-attention of a ViT block.

Shape letters: B images, N tokens per image, D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import vit_linear


class Attention(nn.Module):
    """Multi-head self-attention, [B, N, D] -> [B, N, D], through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = vit_linear(dim, 3 * dim)
        self.proj = vit_linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D / H]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def attention_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights that :meth:`forward` applies, [B, N, D] -> [B, H, N queries, N keys] (each row a
        softmax over the keys); recomputed, since scaled_dot_product_attention does not return them."""
        B, N, D = x.shape
        q, k, _ = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ k.transpose(-2, -1) * (D // self.num_heads) ** -0.5).softmax(dim=-1)
