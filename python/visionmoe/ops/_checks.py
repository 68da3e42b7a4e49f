"""Checks shared by the operator wrappers and fake kernels of every family.

A meta tensor beside a real one dispatches to the fake kernel rather than to the real kernel (the Meta key wins),
so a fake kernel that does not compare devices would hand back uninitialised real tensors. Each fake kernel
therefore checks what the real kernels check about devices.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch


def shape_of(value: Any):
    """A tensor's shape, or the type name of anything else, for error messages."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_count(op: str, name: str, value: Any, *, optional: bool = False) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer >= 0 (Python, NumPy or symbolic), or None
    when ``optional``; a float such as 2.5 or nan, or a bool, is refused rather than truncated."""
    if value is None and optional:
        return
    is_integer = isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)
    if not is_integer or value < 0:
        alternative = ", or None" if optional else ""
        raise ValueError(f"{op}: {name} must be >= 0 and an integer{alternative}, got {value!r}")


def check_same_device(op: str, like_name: str, like: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raises a RuntimeError naming the first of ``tensors`` (None ones are skipped) not on ``like``'s device."""
    for name, tensor in tensors.items():
        if tensor is not None:
            torch._check(tensor.device == like.device,
                         lambda: f"{op}: {name} must be on {like.device} like {like_name}, got {tensor.device}")
