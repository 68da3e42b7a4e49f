"""visionmoe: Mixture-of-Experts routing, dispatch and expert computation for vision models.

Operators live in :mod:`visionmoe.ops` (and ``torch.ops.visionmoe``), their pure-PyTorch references in
:mod:`visionmoe.reference`; routers in :mod:`visionmoe.routers`, auxiliary losses in :mod:`visionmoe.losses`,
MoE layers in :mod:`visionmoe.layers`, models in :mod:`visionmoe.models` (``create_model``), and
:func:`visionmoe.convert.moeify` turns the MLPs of an existing ViT into MoE layers.
"""

import torch  # noqa: F401  (the extension links against torch's libraries; load them first)

from . import _C, convert, data, layers, losses, metrics, models, ops, reference, routers
from .plan import RoutingPlan

__version__ = "0.1.0"


def build_info() -> dict:
    """Facts about this build: the torch it was built against and the one running, whether CUDA kernels were
    built, for which architectures, and the CPU threads ATen uses (OpenMP or its native pool)."""
    info = dict(_C.build_info())
    info["torch_version_running"] = torch.__version__
    info["num_threads"] = torch.get_num_threads()
    return info


__all__ = [
    "RoutingPlan",
    "__version__",
    "build_info",
    "convert",
    "data",
    "layers",
    "losses",
    "metrics",
    "models",
    "ops",
    "reference",
    "routers",
]
