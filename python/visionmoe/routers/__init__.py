"""Routers: modules mapping token features to a routing plan and metrics.

``create_router(name, dim, num_experts, **options)`` builds one by name; ``list_routers()`` lists the names.
Each ``forward(x)`` takes [G, T, D] (G groups routed independently) or [T, D] and returns ``(plan, metrics)``.
"""

from .base import (
    Router,
    RouterMetrics,
    as_groups,
    capacity_from_factor,
    check_finite_logits,
    create_router,
    list_routers,
    register_router,
)
from .expert_choice import ExpertChoiceRouter, SinkhornExpertChoiceRouter
from .hindsight import HindsightRouter
from .soft import SoftRouter, SoftRoutingPlan
from .sparse_expert_choice import (
    SparseExpertChoiceRouter,
    SparseTokenChoiceRouter,
    sparse_simplex_projection,
    sparsity_constrained_transport,
)
from .token_choice import SinkhornTokenChoiceRouter, TokenChoiceRouter

__all__ = [
    "ExpertChoiceRouter",
    "HindsightRouter",
    "Router",
    "RouterMetrics",
    "SinkhornExpertChoiceRouter",
    "SinkhornTokenChoiceRouter",
    "SoftRouter",
    "SoftRoutingPlan",
    "SparseExpertChoiceRouter",
    "SparseTokenChoiceRouter",
    "TokenChoiceRouter",
    "as_groups",
    "capacity_from_factor",
    "check_finite_logits",
    "create_router",
    "list_routers",
    "register_router",
    "sparse_simplex_projection",
    "sparsity_constrained_transport",
]
