"""The dense transformer MLP and the linear layer initialised as timm's ViT initialises its layers.

Shape letters: B images, N tokens per image, D width, F hidden width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def vit_linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear initialised as timm's ViT: weights from a normal of std 0.02 truncated at +-2, zero bias."""
    linear = nn.Linear(in_features, out_features)
    nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


class Mlp(nn.Module):
    """The dense MLP, fc2(gelu(fc1(x))): [B, N, D] -> [B, N, out_dim] (default D) through F hidden units."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.fc1 = vit_linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = vit_linear(hidden_dim, dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
