"""visionmoe's operators: thin, documented wrappers over ``torch.ops.visionmoe``.

Every operator has a CPU kernel, a CUDA kernel (in CUDA builds), a fake kernel for ``torch.compile`` and
registered autograd; ``visionmoe.reference`` holds a pure-PyTorch version of each with the same signature.
"""

from ..plan import RoutingPlan
from .dispatch import LAYOUTS, combine, dispatch, make_plan
from .expert_mlp import ACTIVATIONS, expert_mlp
from .routing import expert_choice_route, topk_route
from .sinkhorn import DEFAULT_SINKHORN_ITERATIONS, sinkhorn
from .soft_moe import soft_combine, soft_dispatch
from .whatwhere import whatwhere_attention

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_SINKHORN_ITERATIONS",
    "LAYOUTS",
    "RoutingPlan",
    "combine",
    "dispatch",
    "expert_choice_route",
    "expert_mlp",
    "make_plan",
    "sinkhorn",
    "soft_combine",
    "soft_dispatch",
    "topk_route",
    "whatwhere_attention",
]
