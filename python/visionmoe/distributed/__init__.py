"""Training on many devices with torch.distributed: the (data, expert) device mesh and helpers to start process
groups. Expert parallelism shards each MoE layer's E experts over the mesh's "ep" dimension; data parallelism
replicates everything else over "dp". ``checkpoint`` writes and reads checkpoints independent of the world size;
``data`` splits global batches over the ranks.
"""

from .checkpoint import (
    load_sharded_weights,
    reshard_optimizer_state,
    send_expert_optimizer_shards,
    sharded_experts,
    unwrap,
    write_full_safetensors,
)
from .data import (
    all_reduce_sum,
    local_batch_size,
    rank_evaluation_batches,
    rank_training_indices,
    routing_group_sizes,
    world,
)
from .mesh import init_mesh, mesh_from_process_groups
from .parallel import clip_grad_norm_, expert_parameters, parallelize
from .processes import run_processes

__all__ = [
    "all_reduce_sum",
    "clip_grad_norm_",
    "expert_parameters",
    "init_mesh",
    "load_sharded_weights",
    "local_batch_size",
    "mesh_from_process_groups",
    "parallelize",
    "rank_evaluation_batches",
    "rank_training_indices",
    "reshard_optimizer_state",
    "routing_group_sizes",
    "run_processes",
    "send_expert_optimizer_shards",
    "sharded_experts",
    "unwrap",
    "world",
    "write_full_safetensors",
]
