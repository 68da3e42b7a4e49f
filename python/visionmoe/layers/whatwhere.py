"""The What-Where Transformer block (PAPERS.md section 5): tokens carry *what*, a where-state of token-slot
logits carries *where*, and both are updated in every block.

Shape letters: B images, N patch tokens, S slots, D width, H heads, dh = D / H.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..routers.checks import check_choice, check_int

#: How the slots aggregate the tokens. "softmax": PAPERS.md's block as written, the softmax of the shared logits
#: over S summed over the N tokens. "mean": slot attention's weighted mean (Locatello et al. 2020), the same sum
#: divided by each slot's attention mass (the softmax over S summed over N), so a slot's update does not grow with
#: the number of tokens it claims.
SLOT_UPDATES = ("softmax", "mean")

#: How a block's where-stream output becomes the next block's where-state. "replace": PAPERS.md's block as
#: written, A_next = FFN_A(...). "add": a residual where stream, A_next = A + FFN_A(...).
WHERE_RESIDUALS = ("replace", "add")

# Added to the per-slot attention mass before dividing by it (slot attention's epsilon), so that a slot that no
# token attends to gets a zero update rather than a division by zero.
SLOT_MASS_EPS = 1e-8

# timm's ViT LayerNorm epsilon, as the ViT blocks.
LAYER_NORM_EPS = 1e-6


class WhatWhereBlock(nn.Module):
    """One what-where block over patch tokens X [B, N, D], slots Z [B, S, D] and the where-state A [B, H, N, S]:

        Xn = LN(X), Zn = LN(Z); Q = Xn Wq, Vx = Xn Wvx; K = Zn Wk, Vz = Zn Wvz       (per head, bias-free)
        L = A + Q K^T / sqrt(dh)                                                      shared logits
        X' = X + Wo_x concat_h(softmax_over_N(L) aggregated over S with Vz)          tokens read slots
        Z' = Z + Wo_z concat_h(softmax_over_S(L) aggregated over N with Vx)          slots read tokens
        X'' = X' + FFN_x(LN(X')),  Z'' = Z' + FFN_z(LN(Z'))                          what streams
        A_next = FFN_A(concat[L as (B, N, H * S), LN(X')]) as [B, H, N, S]           where stream

    The attention is :func:`visionmoe.ops.whatwhere_attention`. The FFNs are pre-norm, as a ViT block's MLP; the
    where stream normalises the token half of its input only, so the logits reach FFN_A at their own scale.

    A model's last block updates only the slots (``token_mlp`` and ``where_mlp`` None): its classifier reads the
    slots and its final where-maps are that block's shared logits L, so the last block's token update, token FFN
    and where stream would reach no output. It then has no slot values (the operator's token update is computed
    from zeros and discarded) and returns the tokens and no where-state.

    Args:
        dim: D. num_heads: H (D a multiple of H). num_slots: S.
        slot_mlp: FFN_z, a module [..., D] -> [..., D].
        token_mlp: FFN_x, a module [..., D] -> [..., D]; None (with ``where_mlp``) for a slots-only last block.
        where_mlp: FFN_A, a module [B, N, H * S + D] -> [B, N, H * S]; None (with ``token_mlp``) for a slots-only
            last block.
        slot_update: one of :data:`SLOT_UPDATES`. where_residual: one of :data:`WHERE_RESIDUALS`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_slots: int,
        slot_mlp: nn.Module,
        token_mlp: Optional[nn.Module],
        where_mlp: Optional[nn.Module],
        slot_update: str = "softmax",
        where_residual: str = "replace",
    ):
        super().__init__()
        dim, num_heads, num_slots = (
            check_int(name, value, 1)
            for name, value in (("dim", dim), ("num_heads", num_heads), ("num_slots", num_slots))
        )
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if (token_mlp is None) != (where_mlp is None):
            raise ValueError(
                "token_mlp and where_mlp must both be modules, or both None for a slots-only last "
                f"block; got token_mlp={type(token_mlp).__name__}, where_mlp={type(where_mlp).__name__}"
            )
        check_choice("slot_update", slot_update, SLOT_UPDATES)
        check_choice("where_residual", where_residual, WHERE_RESIDUALS)
        self.dim, self.num_heads, self.num_slots = dim, num_heads, num_slots
        self.slot_update, self.where_residual = slot_update, where_residual
        self.updates_tokens = token_mlp is not None
        self.norm_tokens = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_slots = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value_tokens = nn.Linear(dim, dim, bias=False)
        self.proj_slots = nn.Linear(dim, dim)
        self.norm_slot_mlp = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.slot_mlp = slot_mlp
        linears = [self.query, self.key, self.value_tokens, self.proj_slots]
        if self.updates_tokens:
            self.value_slots = nn.Linear(dim, dim, bias=False)
            self.proj_tokens = nn.Linear(dim, dim)
            self.norm_token_mlp = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.token_mlp = token_mlp
            self.norm_where = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.where_mlp = where_mlp
            linears += [self.value_slots, self.proj_tokens]
        # The attention's projections start as a ViT's (timm): normal of std 0.02 truncated at +-2, zero bias.
        for linear in linears:
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M, D] -> [B, H, M, dh]."""
        B, M, _ = x.shape
        return x.view(B, M, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, M, dh] -> [B, M, D]."""
        B, _, M, _ = x.shape
        return x.transpose(1, 2).reshape(B, M, self.dim)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, where: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """x [B, N, D], z [B, S, D], where [B, H, N, S] -> (x'' [B, N, D] (x itself in a slots-only block),
        z'' [B, S, D], next where-state [B, H, N, S] (None in a slots-only block), shared logits L [B, H, N, S])."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, {self.dim}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        if tuple(z.shape) != (B, self.num_slots, self.dim):
            raise ValueError(f"z must have shape [{B}, {self.num_slots}, {self.dim}], got {tuple(z.shape)}")
        if tuple(where.shape) != (B, self.num_heads, N, self.num_slots):
            raise ValueError(
                f"where must have shape [{B}, {self.num_heads}, {N}, {self.num_slots}], got {tuple(where.shape)}"
            )
        tokens, slots = self.norm_tokens(x), self.norm_slots(z)
        keys = self._heads(self.key(slots))
        slot_values = self._heads(self.value_slots(slots)) if self.updates_tokens else torch.zeros_like(keys)
        token_update, slot_update, logits = ops.whatwhere_attention(
            self._heads(self.query(tokens)), keys, self._heads(self.value_tokens(tokens)), slot_values, where
        )
        if self.slot_update == "mean":
            slot_mass = logits.softmax(dim=-1).sum(dim=-2)  # [B, H, S]
            slot_update = slot_update / (slot_mass + SLOT_MASS_EPS).unsqueeze(-1)
        z = z + self.proj_slots(self._merge_heads(slot_update))
        z = z + self.slot_mlp(self.norm_slot_mlp(z))
        if not self.updates_tokens:
            return x, z, None, logits
        x = x + self.proj_tokens(self._merge_heads(token_update))
        flat_logits = logits.permute(0, 2, 1, 3).reshape(B, N, self.num_heads * self.num_slots)
        next_where = self.where_mlp(torch.cat([flat_logits, self.norm_where(x)], dim=-1))
        next_where = next_where.view(B, N, self.num_heads, self.num_slots).permute(0, 2, 1, 3)
        if self.where_residual == "add":
            next_where = where + next_where
        x = x + self.token_mlp(self.norm_token_mlp(x))
        return x, z, next_where, logits
