"""Pure-PyTorch reference for the grouped expert MLP: the readable spec and the test oracle.

Same signature as :func:`visionmoe.ops.expert_mlp`. Padded rows go through einsums over the experts, packed rows
through a Python loop over the experts' segments, both under plain autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_expert_mlp, check_expert_mlp_biases, check_expert_offsets_values


def _activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "silu_gated":
        gate, value = pre.chunk(2, dim=-1)
        return F.silu(gate) * value
    raise ValueError(f'expert_mlp: activation must be "gelu" or "silu_gated", got "{activation}"')


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    activation: str = "gelu",
    expert_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.expert_mlp`: padded x [E, C, D] or packed x [M, D] with expert_offsets
    [E + 1] -> y with x's shape."""
    pre_width, _ = check_expert_mlp("expert_mlp", x, w1, w2, expert_offsets, activation)
    check_expert_mlp_biases("expert_mlp", x, w1, b1, b2, pre_width)
    if x.dim() == 3:
        hidden = _activate(torch.einsum("ecd,edf->ecf", x, w1) + b1[:, None], activation)
        return torch.einsum("ecf,efd->ecd", hidden, w2) + b2[:, None]
    bounds = expert_offsets.tolist()
    check_expert_offsets_values("expert_mlp", bounds, x.shape[0])
    outputs = []
    for e in range(w1.shape[0]):
        rows = x[bounds[e] : bounds[e + 1]]
        outputs.append(F.linear(_activate(F.linear(rows, w1[e].T, b1[e]), activation), w2[e].T, b2[e]))
    return torch.cat(outputs) if outputs else x.new_zeros(x.shape)
