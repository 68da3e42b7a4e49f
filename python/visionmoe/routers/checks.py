"""Checks shared by all routers and layers: of the Python options they are built with, and of the dtype of
their inputs.

Each option check returns the option as the type the module computes with (``int``, ``float``, ``bool``) or
raises an error naming the option, what it must be and what it got: a TypeError for an option of the wrong type
(a float for an integer, 1 for a flag), a ValueError for one of the right type out of range (the operators'
error contract, visionmoe.ops). Options are checked at construction: a
wrong type or a non-finite number would otherwise surface only at the first forward pass, as an error about
some internal value (``'<' not supported``, ``cannot convert float NaN to integer``), or not at all.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch


def _or_none(none_means: Optional[str]) -> str:
    return "" if none_means is None else f" (or None for {none_means})"


def check_int(
    name: str, value, minimum: int, maximum: Optional[int] = None, *, none_means: Optional[str] = None
) -> Optional[int]:
    """``value`` as an int in [minimum, maximum] (no upper bound when ``maximum`` is None). A bool is not an
    integer here (``k=True`` is a mistake, not 1). None is accepted only when ``none_means`` says what it
    means; the type error mentions it, the range error does not (None was not the value given)."""
    if value is None and none_means is not None:
        return None
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer {bounds}{_or_none(none_means)}, got {type(value).__name__} {value!r}"
        )
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def check_real(
    name: str,
    value,
    *,
    greater_than: Optional[float] = None,
    at_least: Optional[float] = None,
    at_most: Optional[float] = None,
    none_means: Optional[str] = None,
) -> Optional[float]:
    """``value`` as a finite float, > ``greater_than``, >= ``at_least`` and <= ``at_most`` where given. None is
    accepted only when ``none_means`` says what it means."""
    if value is None and none_means is not None:
        return None
    bounds = ((">", greater_than), (">=", at_least), ("<=", at_most))
    expected = " and ".join(f"{relation} {bound}" for relation, bound in bounds if bound is not None)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number {expected}{_or_none(none_means)}, got {type(value).__name__} {value!r}"
        )
    value = float(value)
    # Comparisons rather than math.isfinite, which torch.compile cannot trace (functions such as
    # sparsity_constrained_transport check their options on every call, also inside a compiled router).
    if not (value == value and abs(value) != math.inf):
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")
    if (
        (greater_than is not None and not value > greater_than)
        or (at_least is not None and value < at_least)
        or (at_most is not None and value > at_most)
    ):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_flag(name: str, value) -> bool:
    """``value``, which must be True or False (not 0, 1 or a string, which are more often mistakes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str], *, allow_none: bool = False) -> Optional[str]:
    """``value``, which must be one of ``choices`` (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}one of {tuple(choices)}, got {value!r}")
    return value


def check_input_dtype(name: str, x: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    """Rejects an input ``x`` that is not a floating-point tensor, or whose dtype is not ``dtype`` (that of the
    weights it meets; None where the module casts its weights to x's dtype). Under ``torch.autocast`` the
    weights are cast to the autocast dtype, so any floating-point x is accepted there."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name} must have the dtype of the layer's weights, {dtype}, got {x.dtype} (convert the "
            "input or the layer, or run under torch.autocast)"
        )
