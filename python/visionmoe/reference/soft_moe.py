"""Pure-PyTorch references for Soft MoE dispatch and combine: the readable spec and the test oracle.

Same signatures as :mod:`visionmoe.ops.soft_moe`. This is the eager formulation (a softmax, then an einsum),
whose autograd keeps each [G, T, S] weight tensor alive until the backward.
"""

from __future__ import annotations

import torch

from ..checks import check_soft_inputs


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax in float32 for float16/bfloat16 logits, rounded once to their dtype."""
    reduced = logits.dtype in (torch.float16, torch.bfloat16)
    return torch.softmax(logits, dim=dim, dtype=torch.float32 if reduced else logits.dtype).to(logits.dtype)


def soft_dispatch(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.soft_dispatch`: x [G, T, D], logits [G, T, S] -> slots [G, S, D]."""
    check_soft_inputs("soft_dispatch", x, "x", logits)
    return torch.einsum("gts,gtd->gsd", _softmax(logits, 1), x)


def soft_combine(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.soft_combine`: y [G, S, D], logits [G, T, S] -> out [G, T, D]."""
    check_soft_inputs("soft_combine", y, "y", logits)
    return torch.einsum("gts,gsd->gtd", _softmax(logits, 2), y)
