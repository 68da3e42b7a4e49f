"""Pure-PyTorch reference of what-where attention: the readable spec and the test oracle.

Same signature as :func:`visionmoe.ops.whatwhere_attention`. This is the eager formulation (an einsum, two
softmaxes, two einsums), whose autograd keeps both [B, H, N, S] softmax outputs alive until the backward.
"""

from __future__ import annotations

import torch

from ..checks import check_whatwhere, check_whatwhere_operand
from .soft_moe import _softmax


def whatwhere_attention(
    q: torch.Tensor, k: torch.Tensor, v_tokens: torch.Tensor, v_slots: torch.Tensor, where: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`visionmoe.ops.whatwhere_attention`: q [B, H, N, dh], k [B, H, S, dh], v_tokens
    [B, H, N, dv], v_slots [B, H, S, dv], where [B, H, N, S] -> (token_update [B, H, N, dv], slot_update
    [B, H, S, dv], logits [B, H, N, S]), with ``logits = where + q k^T / sqrt(dh)``, tokens reading the slots
    through the softmax over tokens (dim -2) and slots reading the tokens through the softmax over slots (dim -1).
    """
    B, H, N, S, _, _ = check_whatwhere("whatwhere_attention", q, k, v_tokens, v_slots)
    check_whatwhere_operand("whatwhere_attention", "where", "[B, H, N, S]", where, (B, H, N, S), q)
    logits = where + torch.einsum("bhnd,bhsd->bhns", q, k) * q.shape[-1] ** -0.5
    token_update = torch.einsum("bhns,bhsd->bhnd", _softmax(logits, -2), v_slots)
    slot_update = torch.einsum("bhns,bhnd->bhsd", _softmax(logits, -1), v_tokens)
    return token_update, slot_update, logits
