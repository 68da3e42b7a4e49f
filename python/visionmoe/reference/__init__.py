"""Pure-PyTorch reference implementations of every visionmoe operator, with the operators' signatures.

They are the readable specification and the oracle of the tests; they are not meant to be fast.
"""

from .dispatch import (
    combine,
    combine_einsum,
    combine_tensor,
    dispatch,
    dispatch_einsum,
    make_plan,
    token_major,
)
from .expert_mlp import expert_mlp
from .routing import expert_choice_route, topk_route
from .sinkhorn import sinkhorn
from .soft_moe import soft_combine, soft_dispatch
from .whatwhere import whatwhere_attention

__all__ = [
    "combine",
    "combine_einsum",
    "combine_tensor",
    "dispatch",
    "dispatch_einsum",
    "expert_choice_route",
    "expert_mlp",
    "make_plan",
    "sinkhorn",
    "soft_combine",
    "soft_dispatch",
    "token_major",
    "topk_route",
    "whatwhere_attention",
]
