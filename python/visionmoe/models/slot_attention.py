"""A slot-attention classifier, the object-discovery baseline of the What-Where Transformer: a shallow ViT encoder
(no class token) whose patch tokens feed :class:`~visionmoe.layers.SlotAttention`, and the head of the WWT variant
"w1" (the slots' logits weighted by each token's assignment, pooled over the tokens).

Shape letters: B images, N patch tokens, S slots, D width, H heads, C classes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import SlotAttention
from ..layers.mlp import Mlp, vit_linear
from ..layers.patch_embed import PatchEmbed
from .registry import register_model
from .vit import LAYER_NORM_EPS, Block, check_vit_sizes
from .whatwhere import HEAD_POOLS, ObjectDiscovery, assignment_discovery, pool_token_logits


class SlotAttentionClassifier(nn.Module):
    """Patch tokens with learned position embeddings through ``depth`` ViT blocks and a norm, then Slot Attention
    (S slots sampled per image, ``iterations`` rounds, GRU updates); the class logits are a shared linear head on
    each normalised slot, weighted by each token's assignment (the last round's softmax over the slots) and pooled
    over the tokens (``head_pool``: "mean" or "max").

    ``forward(x [B, in_chans, img, img]) -> logits [B, num_classes]``; :meth:`discover` returns the assignment's
    maps, argmax-slot masks and boxes as an :class:`~visionmoe.models.ObjectDiscovery` (``where_maps`` holds the
    assignment logits as [B, 1, N, S]).
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 64,
        depth: int = 3,
        num_heads: int = 2,
        num_slots: int = 8,
        iterations: int = 3,
        mlp_ratio: float = 4.0,
        head_pool: str = "mean",
    ):
        super().__init__()
        hidden_dim = check_vit_sizes(
            dict(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                num_classes=num_classes,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=num_heads,
                num_slots=num_slots,
            ),
            mlp_ratio,
        )
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
        self.img_size, self.patch_size, self.num_slots, self.head_pool = img_size, patch_size, num_slots, head_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, Mlp(embed_dim, hidden_dim)) for _ in range(depth)))
        self.norm_tokens = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.slot_attention = SlotAttention(embed_dim, num_slots, iterations, hidden_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = vit_linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_slots(self, x: torch.Tensor):
        """[B, in_chans, img, img] -> (slots after the norm [B, S, D], assignment logits [B, N, S])."""
        tokens = self.norm_tokens(self.blocks(self.patch_embed(x) + self.pos_embed))
        slots, logits = self.slot_attention(tokens)
        return self.norm(slots), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, logits = self.forward_slots(x)
        return pool_token_logits(logits.softmax(dim=-1), self.head(slots), self.head_pool)

    @torch.no_grad()
    def discover(self, x: torch.Tensor) -> ObjectDiscovery:
        """Class logits, the slots' logits and the assignment's maps, masks (argmax slot per patch) and boxes."""
        slots, logits = self.forward_slots(x)
        slot_logits = self.head(slots)
        assignment = logits.softmax(dim=-1)
        return assignment_discovery(
            pool_token_logits(assignment, slot_logits, self.head_pool),
            slot_logits,
            logits.unsqueeze(1),
            assignment,
            self.img_size,
        )


@register_model("slot_attention_32")
def slot_attention_32(**kwargs) -> SlotAttentionClassifier:
    """Slot-attention classifier for 32 px images: patch 4 (N=64 tokens), a 3-block ViT encoder of width 64 with 2
    heads, 8 slots, 3 iterations, 10 classes."""
    return SlotAttentionClassifier(**kwargs)
