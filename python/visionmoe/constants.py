"""Operator options that both the compiled operators (:mod:`visionmoe.ops`) and their pure-PyTorch references
(:mod:`visionmoe.reference`) need. They live here, below both, so that the reference, the test oracle, imports
without the compiled extension.
"""

# The Sinkhorn routers of "Routers in Vision Mixture of Experts" (Liu, Blondel, Riquelme and Puigcerver, 2024,
# arXiv 2401.15969) run a fixed number of iterations, 20 by default: ``maxiter: int = 20`` in the base classes
# of its optimal-transport routers (google-research/vmoe,
# src/vmoe/projects/sparsity_constrained_ot/ot_routing.py).
DEFAULT_SINKHORN_ITERATIONS = 20

# The reductions and teacher formats of the routing-distillation loss (teacher_routing_loss).
REDUCTIONS = ("none", "mean", "sum")
TEACHER_FORMATS = ("probabilities", "logits")
