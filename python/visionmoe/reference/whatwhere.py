"""Pure-PyTorch reference for what-where attention (PAPERS.md section 5): the readable spec and the test oracle.

Same signature as :func:`visionmoe.ops.whatwhere_attention`. This eager version materialises both softmaxes of the
shared logits and keeps them alive for the backward.
"""

from __future__ import annotations

import math

import torch


def whatwhere_attention(q: torch.Tensor, k: torch.Tensor, v_tokens: torch.Tensor, v_slots: torch.Tensor,
                        where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared-logit attention between N tokens and S slots.

    Args:
        q: [B, H, N, dh] token queries. k: [B, H, S, dh] slot keys.
        v_tokens: [B, H, N, dh] token values (read by the slots). v_slots: [B, H, S, dh] slot values (read by the
            tokens).
        where: [B, H, N, S] where-state added to the logits.

    Returns:
        token_update [B, H, N, dh] = softmax over N of L, aggregated over S with v_slots;
        slot_update [B, H, S, dh] = softmax over S of L, aggregated over N with v_tokens;
        logits L [B, H, N, S] = where + q k^T / sqrt(dh).
    """
    logits = where + torch.einsum("bhnd,bhsd->bhns", q, k) / math.sqrt(q.shape[-1])
    token_update = torch.einsum("bhns,bhsd->bhnd", logits.softmax(dim=-2), v_slots)
    slot_update = torch.einsum("bhns,bhnd->bhsd", logits.softmax(dim=-1), v_tokens)
    return token_update, slot_update, logits
