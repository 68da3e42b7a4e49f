"""visionmoe's operators: thin, documented wrappers over ``torch.ops.visionmoe``.

Every operator has a CPU kernel, a CUDA kernel (in CUDA builds), a fake kernel for ``torch.compile`` and
registered autograd; ``visionmoe.reference`` holds a pure-PyTorch version of each with the same signature.

Error contract: an operator's kernels, its fake kernel and its reference raise the same exception type for the
same bad input. Bad argument values, shapes, sizes, devices or index contents (out-of-range indices, inconsistent
plans or offsets, non-finite logits where not allowed) raise ``ValueError``; a wrong dtype raises ``TypeError``.
Messages start with the operator's name and name the argument; the Python checks are worded once in
``visionmoe.checks``. Internal invariants that only a bug could break may raise ``RuntimeError``.
"""

from ..checks import ACTIVATIONS
from ..plan import RoutingPlan
from .dispatch import LAYOUTS, combine, dispatch, make_plan
from .expert_mlp import expert_mlp
from .routing import expert_choice_route, topk_route
from .sinkhorn import DEFAULT_SINKHORN_ITERATIONS, sinkhorn
from .soft_moe import soft_combine, soft_dispatch
from .teacher_routing import REDUCTIONS, TEACHER_FORMATS, teacher_routing_loss
from .whatwhere import whatwhere_attention

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_SINKHORN_ITERATIONS",
    "LAYOUTS",
    "REDUCTIONS",
    "RoutingPlan",
    "TEACHER_FORMATS",
    "combine",
    "dispatch",
    "expert_choice_route",
    "expert_mlp",
    "make_plan",
    "sinkhorn",
    "soft_combine",
    "soft_dispatch",
    "teacher_routing_loss",
    "topk_route",
    "whatwhere_attention",
]
