"""Token groups, the unit routers route and auxiliary losses average over: a [G, T, ...] tensor holds G groups
of T tokens, and a [T, ...] tensor is one group. Kept below both routers and losses, which both need it.
"""

from __future__ import annotations

import torch


def as_groups(x: torch.Tensor, name: str = "x", last: str = "D") -> torch.Tensor:
    """[T, last] -> [1, T, last]; [G, T, last] unchanged; anything else is rejected, naming ``name``."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [T, {last}] or [G, T, {last}], got {tuple(x.shape)}")
    return x
