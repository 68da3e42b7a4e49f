"""Checks shared by the fake kernels of every operator family.

A meta tensor beside a real one dispatches to the fake kernel rather than to the real kernel (the Meta key wins),
so a fake kernel that does not compare devices would hand back uninitialised real tensors. Each fake kernel
therefore checks what the real kernels check about devices.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_same_device(op: str, like_name: str, like: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raises a RuntimeError naming the first of ``tensors`` (None ones are skipped) not on ``like``'s device."""
    for name, tensor in tensors.items():
        if tensor is not None:
            torch._check(tensor.device == like.device,
                         lambda: f"{op}: {name} must be on {like.device} like {like_name}, got {tensor.device}")
