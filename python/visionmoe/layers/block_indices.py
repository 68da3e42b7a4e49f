"""Checking which blocks of a transformer a layer applies to (MoE blocks, teacher blocks), for the layers that
wrap a model's blocks and for the models that choose them."""

from __future__ import annotations

import operator
from typing import Iterable, List


def check_block_indices(indices: Iterable[int], depth: int, name: str) -> List[int]:
    """``indices`` as a sorted list, rejecting duplicates and anything outside [0, depth) with an error naming
    ``name``."""
    checked = []
    for index in indices:
        if isinstance(index, bool) or not hasattr(index, "__index__") or not 0 <= operator.index(index) < depth:
            raise ValueError(f"{name} must hold block indices in [0, {depth}), got {index!r}")
        checked.append(operator.index(index))
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name} has duplicate block indices: {checked}")
    return sorted(checked)
