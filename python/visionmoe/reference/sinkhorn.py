"""Pure-PyTorch reference of log-domain Sinkhorn normalisation: the readable spec and the test oracle.

Same signature as :func:`visionmoe.ops.sinkhorn`. Autograd differentiates through the unrolled iterations,
which keeps every iteration's [G, T, E] intermediates alive until the backward.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_sinkhorn
from ..constants import DEFAULT_SINKHORN_ITERATIONS


def sinkhorn(
    logits: torch.Tensor, num_iterations: int = DEFAULT_SINKHORN_ITERATIONS, *, validate: bool = True
) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.sinkhorn`: log P = logits + u + v for [G, T, E] or [T, E] logits.

    Each iteration sets ``u = -logsumexp_e(logits + v)``, then ``v = log(T / E) - logsumexp_t(logits + u)``,
    from u = v = 0; float16 and bfloat16 logits are computed in float32, as the operator does.
    """
    check_sinkhorn("sinkhorn", logits, num_iterations)
    num_tokens, num_experts = logits.shape[-2:]
    if validate and not torch.isfinite(logits).all():
        raise ValueError("sinkhorn: logits must be finite")
    if num_iterations == 0:
        return logits.clone()
    compute_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    # P is unchanged by a constant per row (u absorbs it); without this shift, logits far from zero (an offset of
    # 1e8 in float32) would meet a u of the opposite sign in scores + u + v and cancel catastrophically.
    scores = logits.to(compute_dtype)
    scores = scores - scores.amax(dim=-1, keepdim=True).detach()
    log_column_mass = math.log(num_tokens) - math.log(num_experts)
    u = scores.new_zeros(scores.shape[:-1]).unsqueeze(-1)  # [..., T, 1]
    v = scores.new_zeros(scores.shape[:-2] + (1, num_experts))  # [..., 1, E]
    for _ in range(num_iterations):
        u = -torch.logsumexp(scores + v, dim=-1, keepdim=True)
        v = log_column_mass - torch.logsumexp(scores + u, dim=-2, keepdim=True)
    return (scores + u + v).to(logits.dtype)
