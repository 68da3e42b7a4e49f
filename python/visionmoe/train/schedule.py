"""The learning-rate schedule of :class:`~visionmoe.train.Trainer`: linear warm-up, then cosine decay, per step."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier of step s: linear from 1/warmup_steps to 1 over the warm-up, then a cosine from 1
    down to ``min_ratio`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
