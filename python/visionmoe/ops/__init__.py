"""visionmoe's operators: thin, documented wrappers over ``torch.ops.visionmoe``.

Every operator has a CPU kernel, a CUDA kernel (in CUDA builds), a fake kernel for ``torch.compile`` and
registered autograd; ``visionmoe.reference`` holds a pure-PyTorch version of each with the same signature.
"""

from ..plan import RoutingPlan
from .dispatch import LAYOUTS, combine, dispatch, make_plan
from .sinkhorn import DEFAULT_SINKHORN_ITERATIONS, sinkhorn

__all__ = ["LAYOUTS", "RoutingPlan", "combine", "dispatch", "make_plan", "DEFAULT_SINKHORN_ITERATIONS", "sinkhorn"]
