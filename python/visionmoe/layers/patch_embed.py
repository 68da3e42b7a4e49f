"""Images to patch tokens, the first layer of a ViT.

Shape letters: B images, N' patch tokens, D width.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a stride-``patch_size`` convolution: [B, C_in, img, img] -> [B, N', D] with
    N' = (img / patch_size)^2 patch tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.in_chans = img_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)
