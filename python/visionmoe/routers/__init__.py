"""Routers: modules mapping token features to a routing plan and metrics.

``create_router(name, dim, num_experts, **options)`` builds one by name; ``list_routers()`` lists the names.
Each ``forward(x)`` takes [G, T, D] (G groups routed independently) or [T, D] and returns ``(plan, metrics)``.
"""

from .base import Router, RouterMetrics, as_groups, check_finite_logits, create_router, list_routers, register_router
from .soft import SoftRouter, SoftRoutingPlan

__all__ = [
    "Router",
    "RouterMetrics",
    "SoftRouter",
    "SoftRoutingPlan",
    "as_groups",
    "check_finite_logits",
    "create_router",
    "list_routers",
    "register_router",
]
