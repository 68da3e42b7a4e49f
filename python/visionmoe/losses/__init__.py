"""Auxiliary losses: pure functions of router logits, probabilities and assignments, per group.

See :mod:`visionmoe.losses.router` for the formulas, their sources and the conventions (groups, dtypes).
"""

from .diversity import diversity_loss
from .router import (
    entropy_loss,
    gshard_loss,
    importance_loss,
    load_loss,
    router_z_loss,
    switch_load_balancing_loss,
)
from .teacher_routing import routing_distillation_loss

__all__ = [
    "diversity_loss",
    "entropy_loss",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "routing_distillation_loss",
    "router_z_loss",
    "switch_load_balancing_loss",
]
