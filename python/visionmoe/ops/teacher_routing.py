"""Routing distillation loss of TGR-MoE (PAPERS.md section 4).

Until the fused CPU/CUDA operator lands, this is the pure-PyTorch reference under the operator's name and
signature, so that callers already use ``visionmoe.ops.teacher_routing_loss``.
"""

from ..reference.teacher_routing import teacher_routing_loss

__all__ = ["teacher_routing_loss"]
