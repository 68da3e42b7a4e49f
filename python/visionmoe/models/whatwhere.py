"""What-Where Transformer (PAPERS.md section 5): patch tokens carry *what*, learned slots gather objects, and a
where-state of token-slot logits, updated in every block, carries *where*; classified from the slots, its final
where-maps are per-slot object masks.

Shape letters: B images, N patch tokens, S slots, D width, H heads, C classes.

Variants (:data:`WWT_VARIANTS`, chosen by name): "w0" is PAPERS.md's reading as written; "w1" classifies through the
maps, "w2" gives the last block a where stream, "w3" samples the slots per image (see :class:`WhatWhereVariant`).
Map readouts (:data:`READOUTS`): "assignment", the softmax over the slots that the model itself computes (argmax
slot per patch for the masks), or "token_softmax", the softmax over the patches rescaled and thresholded.
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

#: How :meth:`WhatWhereTransformer.discover` reads object maps from the final where-maps. "assignment": the model's
#: own assignment of each patch to the slots, the softmax over S (averaged over heads), and each patch's argmax slot
#: as the masks (every patch in exactly one mask). "token_softmax": the softmax over the N patches (where each slot
#: looks, as a ViT's class-token attention), each map rescaled to [0, 1] and thresholded.
READOUTS = ("assignment", "token_softmax")

#: How the "assignment" head pools its per-token logits over the tokens: "mean" (the slot logits weighted by each
#: slot's mean assignment, for single-label training) or "max" (a class scores where it is strongest, for
#: multi-label training).
HEAD_POOLS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class WhatWhereVariant:
    """One choice of how a WWT reads its maps and slots.

    Attributes:
        head: "slots", a shared head on each final slot, averaged over the slots (PAPERS.md); or "assignment",
            the classifier consumes the maps: per-token logits are the slots' logits weighted by the token's
            assignment (the final maps' softmax over the slots, averaged over heads), pooled over the tokens
            (``head_pool``), so the task loss reaches the maps directly.
        last_block: "slots", the last block updates only the slots and its shared logits are the final maps; or
            "full", the last block also updates the tokens and the where-state, and the final maps are the last
            where-state.
        slot_init: "learned", S learned slots; or "sampled", slots drawn per image (in training and evaluation) as
            a learned mean plus a learned scale times Gaussian noise, shared by all slots, as Slot Attention.
    """

    head: str = "slots"
    last_block: str = "slots"
    slot_init: str = "learned"


#: The named variants of issue 17's experiment: W0 as PAPERS.md, and one change each; "w12" adds W1's head to W2,
#: since W2's last where-state reaches no output through W0's head (its last where stream gets no gradient).
WWT_VARIANTS = {
    "w0": WhatWhereVariant(),
    "w1": WhatWhereVariant(head="assignment"),
    "w2": WhatWhereVariant(last_block="full"),
    "w3": WhatWhereVariant(slot_init="sampled"),
    "w12": WhatWhereVariant(head="assignment", last_block="full"),
}


def assignment_discovery(
    logits: torch.Tensor, slot_logits: torch.Tensor, where_maps: torch.Tensor, assignment: torch.Tensor, img_size: int
) -> "ObjectDiscovery":
    """An :class:`ObjectDiscovery` from an assignment of patches to slots, [B, N, S] with each row summing to 1
    over the slots: the masks are each patch's argmax slot, upsampled to the image (nearest)."""
    B, N, S = assignment.shape
    side = int(round(N**0.5))
    segments = assignment.argmax(dim=-1).view(B, side, side)
    scale = img_size // side
    pixels = segments.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    masks = pixels[:, None] == torch.arange(S, device=pixels.device)[None, :, None, None]
    slot_maps = F.interpolate(assignment.transpose(1, 2).reshape(B, S, side, side), size=img_size, mode="nearest")
    return ObjectDiscovery(
        logits=logits,
        slot_logits=slot_logits,
        where_maps=where_maps,
        slot_maps=slot_maps,
        masks=masks,
        boxes=masks_to_boxes(masks),
        segments=segments,
        readout="assignment",
    )


@dataclasses.dataclass
class ObjectDiscovery:
    """What :meth:`WhatWhereTransformer.discover` returns for a batch of B images of side ``img``.

    Attributes:
        logits: [B, C] class logits (the mean of ``slot_logits`` over the slots).
        slot_logits: [B, S, C] each slot's class logits.
        where_maps: [B, H, N, S] the final where-maps (the last block's shared logits, or with a full last block
            the last where-state).
        slot_maps: [B, S, img, img] per-slot maps on the image. Readout "assignment": each patch's share of each
            slot, the softmax of the where-maps over the S slots averaged over heads (the normalisation of the
            slots' update), upsampled (nearest). Readout "token_softmax": where each slot looks, the softmax over
            the N patches (the normalisation of the tokens' update, as a ViT's class-token attention is a softmax
            over the patches), averaged over heads, bilinearly upsampled.
        masks: [B, S, img, img] bool. "assignment": the pixels of the patches whose argmax slot is s (disjoint,
            covering the image). "token_softmax": each slot map rescaled to [0, 1] by its own minimum and maximum
            (:func:`visionmoe.metrics.normalise_maps`, as for any attention map), then ``>= threshold``.
        boxes: [B, S, 4] float (x0, y0, x1, y1; x1, y1 exclusive) around each mask; (0, 0, 0, 0) for an empty one.
        segments: [B, img / patch, img / patch] int64, the argmax slot per patch (of the assignment, or of the
            rescaled token-softmax maps).
        readout: which of :data:`READOUTS` made the maps.
    """

    logits: torch.Tensor
    slot_logits: torch.Tensor
    where_maps: torch.Tensor
    slot_maps: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    segments: torch.Tensor
    readout: str


class WhatWhereTransformer(nn.Module):
    """What-Where Transformer: patch tokens with learned position embeddings, S learned slots (no class token) and
    a where-state that starts at zero, through ``depth`` :class:`~visionmoe.layers.WhatWhereBlock`; by default (variant
    "w0") the last block updates only the slots and its shared logits are the final where-maps, and the class logits
    are a shared linear head applied to each normalised final slot, averaged over the slots.

    ``forward(x [B, in_chans, img_size, img_size]) -> logits [B, num_classes]``; :meth:`discover` also returns the
    where-maps, per-slot masks and boxes.

    Args:
        img_size, patch_size, in_chans: the square input and its patches (img_size a multiple of patch_size).
        num_classes: C. embed_dim: D. depth: blocks. num_heads: H (D a multiple of H). num_slots: S.
        mlp_ratio: hidden width of the token and slot FFNs, int(D * mlp_ratio).
        where_hidden_dim: hidden width of the where FFN (input H * S + D, output H * S); default D.
        slot_update, where_residual: the blocks' choices (:data:`~visionmoe.layers.SLOT_UPDATES`,
            :data:`~visionmoe.layers.WHERE_RESIDUALS`); the defaults are PAPERS.md's block as written.
        variant: a name in :data:`WWT_VARIANTS` or a :class:`WhatWhereVariant`; "w0" is PAPERS.md's reading.
        head_pool: with the "assignment" head, one of :data:`HEAD_POOLS`.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_slots: int = 16,
        mlp_ratio: float = 4.0,
        where_hidden_dim: Optional[int] = None,
        slot_update: str = "softmax",
        where_residual: str = "replace",
        variant="w0",
        head_pool: str = "mean",
    ):
        super().__init__()
        if isinstance(variant, str):
            if variant not in WWT_VARIANTS:
                raise ValueError(f"variant must be one of {tuple(WWT_VARIANTS)} or a WhatWhereVariant, got {variant!r}")
            variant = WWT_VARIANTS[variant]
        if not isinstance(variant, WhatWhereVariant):
            raise ValueError(f"variant must be one of {tuple(WWT_VARIANTS)} or a WhatWhereVariant, got {variant!r}")
        for name, value, choices in (
            ("variant.head", variant.head, ("slots", "assignment")),
            ("variant.last_block", variant.last_block, ("slots", "full")),
            ("variant.slot_init", variant.slot_init, ("learned", "sampled")),
            ("head_pool", head_pool, HEAD_POOLS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.variant, self.head_pool = variant, head_pool
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
        where_hidden_dim = embed_dim if where_hidden_dim is None else where_hidden_dim
        if where_hidden_dim < 1:
            raise ValueError(f"where_hidden_dim must be >= 1, got {where_hidden_dim}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_heads, self.num_slots = num_heads, num_slots
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim))
        if variant.slot_init == "learned":
            self.slots = nn.Parameter(torch.empty(num_slots, embed_dim))
        else:
            self.slots_mu = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.slots_log_sigma = nn.Parameter(torch.zeros(1, 1, embed_dim))
        where_width = num_heads * num_slots

        def block(last: bool) -> WhatWhereBlock:
            return WhatWhereBlock(
                embed_dim,
                num_heads,
                num_slots,
                slot_mlp=Mlp(embed_dim, hidden_dim),
                token_mlp=None if last else Mlp(embed_dim, hidden_dim),
                where_mlp=None if last else Mlp(where_width + embed_dim, where_hidden_dim, out_dim=where_width),
                slot_update=slot_update,
                where_residual=where_residual,
            )

        slots_only_last = variant.last_block == "slots"
        self.blocks = nn.ModuleList(block(last=slots_only_last and i == depth - 1) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = vit_linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Unit scale, as slot attention's slots: at the start every slot reads the same uniform mix of the tokens,
        # so slots drawn at the position embeddings' scale would be swamped by that shared update and stay alike.
        # (Sampled slots: the mean at the same unit scale, noise of unit scale at the start.)
        nn.init.normal_(self.slots if variant.slot_init == "learned" else self.slots_mu)

    def initial_slots(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """[batch, S, D]: the learned slots, or slots sampled per image (torch's global generator)."""
        if self.variant.slot_init == "learned":
            return self.slots.expand(batch, -1, -1)
        noise = torch.randn(batch, self.num_slots, self.slots_mu.shape[-1], dtype=like.dtype, device=like.device)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def forward_slots(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, in_chans, img, img] -> (final slots after the norm [B, S, D], final where-maps [B, H, N, S])."""
        tokens = self.patch_embed(x) + self.pos_embed
        B, N, _ = tokens.shape
        slots = self.initial_slots(B, tokens)
        where = tokens.new_zeros(B, self.num_heads, N, self.num_slots)
        for block in self.blocks:  # a slots-only last block returns no where-state: its logits are the final maps
            tokens, slots, where, logits = block(tokens, slots, where)
        return self.norm(slots), logits if where is None else where

    def assignment(self, where_maps: torch.Tensor) -> torch.Tensor:
        """The model's own assignment of patches to slots: the softmax of where-maps [B, H, N, S] over the slots,
        averaged over heads, [B, N, S] (each row sums to 1)."""
        return where_maps.softmax(dim=-1).mean(dim=1)

    def _logits(self, slot_logits: torch.Tensor, where_maps: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] from the slots' logits [B, S, C] and the final where-maps, as the variant's head."""
        if self.variant.head == "slots":
            return slot_logits.mean(dim=1)
        return pool_token_logits(self.assignment(where_maps), slot_logits, self.head_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, where_maps = self.forward_slots(x)
        return self._logits(self.head(slots), where_maps)

    @torch.no_grad()
    def discover(self, x: torch.Tensor, threshold: float = 0.5, readout: str = "assignment") -> ObjectDiscovery:
        """Class logits, final where-maps, per-slot maps, masks and boxes for images x [B, in_chans, img, img],
        read out as ``readout`` (one of :data:`READOUTS`; ``threshold`` applies to "token_softmax" only); see
        :class:`ObjectDiscovery`."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        slots, where_maps = self.forward_slots(x)
        slot_logits = self.head(slots)
        logits = self._logits(slot_logits, where_maps)
        if readout == "assignment":
            return assignment_discovery(logits, slot_logits, where_maps, self.assignment(where_maps), self.img_size)
        side = self.img_size // self.patch_size
        # The softmax over N ignores a where-state that favours a slot everywhere, which decides a softmax over S.
        attention = where_maps.softmax(dim=-2).mean(dim=1).transpose(1, 2).reshape(-1, self.num_slots, side, side)
        slot_maps = F.interpolate(attention, size=self.img_size, mode="bilinear", align_corners=False)
        masks = normalise_maps(slot_maps) >= threshold
        return ObjectDiscovery(
            logits=logits,
            slot_logits=slot_logits,
            where_maps=where_maps,
            slot_maps=slot_maps,
            masks=masks,
            boxes=masks_to_boxes(masks),
            segments=normalise_maps(attention).argmax(dim=1),
            readout=readout,
        )


def pool_token_logits(assignment: torch.Tensor, slot_logits: torch.Tensor, pool: str) -> torch.Tensor:
    """A head that consumes the maps: per-token logits, the slots' logits [B, S, C] weighted by each token's
    assignment [B, N, S], pooled over the N tokens by ``pool`` ("mean": the slot logits weighted by each slot's
    mean assignment; "max") -> [B, C]."""
    token_logits = assignment @ slot_logits  # [B, N, C]
    return token_logits.mean(dim=1) if pool == "mean" else token_logits.amax(dim=1)


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
