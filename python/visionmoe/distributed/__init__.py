"""Training on many devices with torch.distributed: the (data, expert) device mesh and helpers to start process
groups. Expert parallelism shards each MoE layer's E experts over the mesh's "ep" dimension; data parallelism
replicates everything else over "dp".
"""

from .mesh import init_mesh, mesh_from_process_groups
from .parallel import clip_grad_norm_, expert_parameters, parallelize
from .processes import run_processes

__all__ = ["clip_grad_norm_", "expert_parameters", "init_mesh", "mesh_from_process_groups", "parallelize",
           "run_processes"]
