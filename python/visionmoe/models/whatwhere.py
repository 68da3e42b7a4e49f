"""What-Where Transformer (PAPERS.md section 5): patch tokens carry *what*, learned slots gather objects, and a
where-state of token-slot logits, updated in every block, carries *where*; classified from the slots, its final
where-maps are per-slot object masks.

Shape letters: B images, N patch tokens, S slots, D width, H heads, C classes.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import WhatWhereBlock
from ..layers.mlp import Mlp, vit_linear
from ..layers.patch_embed import PatchEmbed
from ..metrics import masks_to_boxes, normalise_maps
from .registry import register_model
from .vit import _SIZES, LAYER_NORM_EPS, check_vit_sizes


@dataclasses.dataclass
class ObjectDiscovery:
    """What :meth:`WhatWhereTransformer.discover` returns for a batch of B images of side ``img``.

    Attributes:
        logits: [B, C] class logits (the mean of ``slot_logits`` over the slots).
        slot_logits: [B, S, C] each slot's class logits.
        where_maps: [B, H, N, S] the final where-maps: the last block's shared logits.
        slot_maps: [B, S, img, img]: where each slot looks, the softmax of the where-maps over the N patches (the
            normalisation of the tokens' update, as a ViT's class-token attention is a softmax over the patches),
            averaged over heads, on the patch grid, bilinearly upsampled to the image.
        masks: [B, S, img, img] bool: each slot map rescaled to [0, 1] by its own minimum and maximum
            (:func:`visionmoe.metrics.normalise_maps`, as for any attention map), then ``>= threshold``.
        boxes: [B, S, 4] float (x0, y0, x1, y1; x1, y1 exclusive) around each mask; (0, 0, 0, 0) for an empty one.
    """

    logits: torch.Tensor
    slot_logits: torch.Tensor
    where_maps: torch.Tensor
    slot_maps: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor


class WhatWhereTransformer(nn.Module):
    """What-Where Transformer: patch tokens with learned position embeddings, S learned slots (no class token) and
    a where-state that starts at zero, through ``depth`` :class:`~visionmoe.layers.WhatWhereBlock`; the last block
    updates only the slots and its shared logits are the final where-maps. Class logits are a shared linear head
    applied to each normalised final slot, averaged over the slots.

    ``forward(x [B, in_chans, img_size, img_size]) -> logits [B, num_classes]``; :meth:`discover` also returns the
    where-maps, per-slot masks and boxes.

    Args:
        img_size, patch_size, in_chans: the square input and its patches (img_size a multiple of patch_size).
        num_classes: C. embed_dim: D. depth: blocks. num_heads: H (D a multiple of H). num_slots: S.
        mlp_ratio: hidden width of the token and slot FFNs, int(D * mlp_ratio).
        where_hidden_dim: hidden width of the where FFN (input H * S + D, output H * S); default D.
        slot_update, where_residual: the blocks' choices (:data:`~visionmoe.layers.SLOT_UPDATES`,
            :data:`~visionmoe.layers.WHERE_RESIDUALS`); the defaults are PAPERS.md's block as written.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, num_slots: int = 16,
                 mlp_ratio: float = 4.0, where_hidden_dim: Optional[int] = None, slot_update: str = "softmax",
                 where_residual: str = "replace"):
        super().__init__()
        hidden_dim = check_vit_sizes(dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                                          num_heads=num_heads, num_slots=num_slots), mlp_ratio)
        where_hidden_dim = embed_dim if where_hidden_dim is None else where_hidden_dim
        if where_hidden_dim < 1:
            raise ValueError(f"where_hidden_dim must be >= 1, got {where_hidden_dim}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_heads, self.num_slots = num_heads, num_slots
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim))
        self.slots = nn.Parameter(torch.empty(num_slots, embed_dim))
        where_width = num_heads * num_slots

        def block(last: bool) -> WhatWhereBlock:
            return WhatWhereBlock(
                embed_dim, num_heads, num_slots, slot_mlp=Mlp(embed_dim, hidden_dim),
                token_mlp=None if last else Mlp(embed_dim, hidden_dim),
                where_mlp=None if last else Mlp(where_width + embed_dim, where_hidden_dim, out_dim=where_width),
                slot_update=slot_update, where_residual=where_residual)

        self.blocks = nn.ModuleList(block(last=i == depth - 1) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = vit_linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Unit scale, as slot attention's slots: at the start every slot reads the same uniform mix of the tokens,
        # so slots drawn at the position embeddings' scale would be swamped by that shared update and stay alike.
        nn.init.normal_(self.slots)

    def forward_slots(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, in_chans, img, img] -> (final slots after the norm [B, S, D], final where-maps [B, H, N, S])."""
        tokens = self.patch_embed(x) + self.pos_embed
        B, N, _ = tokens.shape
        slots = self.slots.expand(B, -1, -1)
        where = tokens.new_zeros(B, self.num_heads, N, self.num_slots)
        for block in self.blocks:  # the last block returns no where-state: its logits are the final maps
            tokens, slots, where, logits = block(tokens, slots, where)
        return self.norm(slots), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, _ = self.forward_slots(x)
        return self.head(slots).mean(dim=1)

    @torch.no_grad()
    def discover(self, x: torch.Tensor, threshold: float = 0.5) -> ObjectDiscovery:
        """Class logits, final where-maps, per-slot maps, masks (rescaled maps >= ``threshold``) and boxes for
        images x [B, in_chans, img, img]; see :class:`ObjectDiscovery`."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        slots, where_maps = self.forward_slots(x)
        slot_logits = self.head(slots)
        side = self.img_size // self.patch_size
        # Over the patches rather than over the slots: a softmax over N ignores a where-state that favours a slot
        # everywhere, which would otherwise decide a softmax over S alone.
        attention = where_maps.softmax(dim=-2).mean(dim=1).transpose(1, 2)  # [B, S, N]
        slot_maps = F.interpolate(attention.reshape(-1, self.num_slots, side, side), size=self.img_size,
                                  mode="bilinear", align_corners=False)
        masks = normalise_maps(slot_maps) >= threshold
        return ObjectDiscovery(logits=slot_logits.mean(dim=1), slot_logits=slot_logits, where_maps=where_maps,
                               slot_maps=slot_maps, masks=masks, boxes=masks_to_boxes(masks))


# 224 px: N = 196 patches of 16 px and S = 16 slots. 32 px: N = 64 patches of 4 px and S = 8 slots, enough for the
# 2 to 4 digits of a digit_scenes image plus background slots.
_IMAGENET = dict(img_size=224, patch_size=16, num_classes=1000, num_slots=16)
_SMALL_IMAGES = dict(img_size=32, patch_size=4, num_classes=10, num_slots=8)


def _build(size: str, resolution: Dict, kwargs: Dict) -> WhatWhereTransformer:
    """An entrypoint's model: keyword arguments override the ViT size's and the resolution's defaults."""
    return WhatWhereTransformer(**{**_SIZES[size], **resolution, **kwargs})


@register_model("wwt_tiny")
def wwt_tiny(**kwargs) -> WhatWhereTransformer:
    """WWT-Ti/16, 224 px: as vit_tiny (D=192, 12 blocks, 3 heads, F=768), 16 slots, 1000 classes."""
    return _build("tiny", _IMAGENET, kwargs)


@register_model("wwt_small")
def wwt_small(**kwargs) -> WhatWhereTransformer:
    """WWT-S/16, 224 px: as vit_small (D=384, 12 blocks, 6 heads, F=1536), 16 slots, 1000 classes."""
    return _build("small", _IMAGENET, kwargs)


@register_model("wwt_tiny_32")
def wwt_tiny_32(**kwargs) -> WhatWhereTransformer:
    """wwt_tiny for 32 px images: patch 4 (N=64 tokens), 8 slots, 10 classes."""
    return _build("tiny", _SMALL_IMAGES, kwargs)


@register_model("wwt_small_32")
def wwt_small_32(**kwargs) -> WhatWhereTransformer:
    """wwt_small for 32 px images: patch 4 (N=64 tokens), 8 slots, 10 classes."""
    return _build("small", _SMALL_IMAGES, kwargs)
