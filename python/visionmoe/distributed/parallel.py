"""Expert and data parallelism for a whole model: :func:`parallelize` and :func:`clip_grad_norm_`.

Gradient scaling (the contract the tests check). Each rank's loss is the mean over its local batch, and all ranks
hold equal local batches, so the one-process loss on the global batch is L = (1 / W) sum_r L_r over the W ranks.
- Dense parameters are replicated on every rank; DistributedDataParallel averages their gradients over the W ranks:
  (1 / W) sum_r dL_r/dtheta = dL/dtheta.
- An expert lives on one rank of each EP group (S ranks) and has a replica in each of the W / S EP groups (the
  ranks of mesh["dp"] with the same EP index). Through the all-to-all's backward, its gradient on one rank is the
  SUM over the S peers of its EP group of dL_p/dtheta. Summing over the dp replicas gives the sum over all W
  ranks, and dividing by W gives exactly dL/dtheta. (Averaging over dp instead, as DeepSpeed #5618 and MegaBlocks
  #86 did at times, is off by a factor S.)
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from ..layers import ConvMoE, ExpertMLPs, MoEMLP, SoftMoEMLP
from ..routers import Router

_EXPERT_GRADIENT_HOOKS = "_visionmoe_expert_gradient_hooks"


def parallelize(
    model: nn.Module, mesh: DeviceMesh, *, debug: Optional[bool] = None, **ddp_options
) -> DistributedDataParallel:
    """Expert parallelism over ``mesh["ep"]`` and data parallelism over the whole world, in place on ``model``.

    Every :class:`~visionmoe.layers.MoEMLP` and :class:`~visionmoe.layers.SoftMoEMLP` of ``model`` keeps only its
    rank's experts (rank j of the S = ``mesh["ep"].size()`` EP ranks keeps experts [j E / S, (j + 1) E / S), sliced
    from its current full weights, so build the model with the same seed on every rank) and exchanges expert rows
    with its EP peers in its forward. The model is then wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` over the default (whole-world) process group, which
    averages the gradients of every other ("dense") parameter over the W ranks; the expert parameters are excluded
    from DDP, and a gradient hook on each of them sums its gradient over its replicas (``mesh["dp"]``) and divides
    it by W, which makes it exactly the one-process gradient on the global batch (see the module docstring). With
    ``mesh["ep"].size() == 1`` this is plain DDP over all parameters.

    Contract:
        - the returned module's ``forward`` is the model's, on this rank's local batch (every rank the same local
          batch size, the MoE layers' ``group_size`` dividing it); the per-rank loss should be the mean over the
          local batch, so that the gradients are those of the global batch's mean loss;
        - ``returned.module`` is ``model`` itself (sharded in place): save, evaluate and inspect through it;
        - the expert parameters are those of each MoE layer's ``experts`` (:class:`~visionmoe.layers.ExpertMLPs`:
          ``w1, b1, w2, b2``), listed by :func:`expert_parameters`; they hold ``experts.num_local_experts`` rows
          starting at global expert ``experts.first_expert``. Clip gradients with :func:`clip_grad_norm_`, which
          counts each expert shard once;
        - routing is per group: MoEMLP layers with group_size=None route each rank's local batch as one group
          (a warning says so), which differs from one process on the global batch; router noise (noise_std > 0,
          the token-choice default, and hindsight's Gumbel noise) is drawn for the global batch on every rank and
          sliced to the rank's groups (each router's ``noise_shard``), so with every rank seeded alike and given
          the rank-ordered slice of the global batch, noisy routing equals one process's too;
        - the expert gradients are reduced in the backward pass of every step, also inside DDP's ``no_sync()``
          (correct with gradient accumulation, with one reduction per micro-batch).

    Args:
        model: the model on its device, built with the same seed on every rank.
        mesh: a ("dp", "ep") mesh from :func:`visionmoe.distributed.init_mesh`.
        debug: check at every MoE layer that the ranks of an EP group agree on the layer and on its input shapes,
            raising a clear error otherwise (default: the environment variable VISIONMOE_DISTRIBUTED_DEBUG=1).
        **ddp_options: passed to DistributedDataParallel (e.g. ``find_unused_parameters``).

    Raises:
        ValueError: E not divisible by the EP size; a ConvMoE (or any other holder of experts) under EP, which
            is not supported: its image capacity spans the local batch and its bodies are not ExpertMLPs.
    """
    if tuple(mesh.mesh_dim_names or ()) != ("dp", "ep"):
        raise ValueError(f"parallelize needs a mesh with dimensions ('dp', 'ep'), got {mesh.mesh_dim_names}")
    expert_parallel = mesh["ep"].size()
    world_size = dist.get_world_size()
    ungrouped = [
        name for name, module in model.named_modules() if isinstance(module, MoEMLP) and module.group_size is None
    ]
    if world_size > 1 and ungrouped:
        warnings.warn(
            f"the MoE layers {ungrouped} route the whole batch as one group (group_size=None): on {world_size} "
            "ranks each rank routes its local batch as one group, which is not the one-process routing of "
            "the global batch (capacity and expert choice span the group); set group_size to make the "
            "result independent of the world size",
            stacklevel=2,
        )
    if world_size > 1:
        for module in model.modules():
            if isinstance(module, Router):
                module.noise_shard = (dist.get_rank(), world_size)
    if expert_parallel > 1:
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, (MoEMLP, SoftMoEMLP))]
        owned = {id(layer.experts) for _, layer in layers}
        for name, module in model.named_modules():
            if isinstance(module, ConvMoE):
                raise ValueError(
                    f"ConvMoE ({name!r}) does not support expert parallelism: its image-gated capacity "
                    "spans the whole local batch and its expert bodies are convolutions, not "
                    "ExpertMLPs; use expert_parallel=1 (plain data parallelism) for CNN MoE models"
                )
            if isinstance(module, ExpertMLPs) and id(module) not in owned:
                raise ValueError(
                    f"the experts {name!r} are not the experts of an MoEMLP or SoftMoEMLP, and only those "
                    "layers route across an expert-parallel group"
                )
        ep_group, dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        for name, layer in layers:
            if layer.experts.expert_group is None:
                layer.expert_parallel_(ep_group, name=name or type(layer).__name__, debug=debug)
        expert_names = [name for name, _ in _expert_parameters(model)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
        _install_expert_gradient_reduction(model, dp_group, world_size)
    if "device_ids" not in ddp_options:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            ddp_options["device_ids"] = [device]
    return DistributedDataParallel(model, **ddp_options)


def _expert_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertMLPs) and module.expert_group is not None:
            for name, parameter in module.named_parameters(recurse=False):
                yield (f"{module_name}.{name}" if module_name else name), parameter


def expert_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert-parallel (sharded) expert parameter of ``model`` (or of the module a
    DDP wrapper holds), with names as in ``model.named_parameters()``."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return list(_expert_parameters(model))


def _install_expert_gradient_reduction(model: nn.Module, dp_group: dist.ProcessGroup, world_size: int) -> None:
    dp_size = dist.get_world_size(dp_group)

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        # Runs on each backward's gradient before it is accumulated into .grad: sum over the expert's replicas, then
        # divide by W (the module docstring says why it is W and not the number of replicas).
        if dp_size > 1:
            grad = grad.clone()
            dist.all_reduce(grad, group=dp_group)
        return grad / world_size

    handles: Dict[str, object] = {}
    for name, parameter in _expert_parameters(model):
        handles[name] = parameter.register_hook(reduce)
    setattr(model, _EXPERT_GRADIENT_HOOKS, handles)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: Optional[DeviceMesh] = None) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` (2-norm) for a :func:`parallelize`-d model: the total norm of all
    gradients of the full model as one process holds it, each expert shard counted once.

    Dense gradients are identical on every rank after DDP; the squared norms of the expert shards are summed over
    the EP group (the expert gradients are identical across the dp replicas after the reduction). Every rank of
    the world must call it. Returns the total norm (before clipping), the same on every rank.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    experts = expert_parameters(model)
    expert_ids = {id(p) for _, p in experts}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    sharded = [p.grad for _, p in experts if p.grad is not None]
    grads = dense + sharded
    if not grads:
        return torch.zeros(())
    device = grads[0].device

    def squared(tensors):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for tensor in tensors:
            total += tensor.detach().to(torch.float64).square().sum()
        return total

    expert_squared = squared(sharded)
    if experts:
        group = mesh.get_group("ep") if mesh is not None else _expert_group(model)
        dist.all_reduce(expert_squared, group=group)
    total = (squared(dense) + expert_squared).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.dtype))
    return total.to(grads[0].dtype)


def _expert_group(model: nn.Module) -> dist.ProcessGroup:
    groups = {
        id(m.expert_group): m.expert_group
        for m in model.modules()
        if isinstance(m, ExpertMLPs) and m.expert_group is not None
    }
    if len(groups) != 1:
        raise ValueError("the model's experts are sharded over several process groups; pass the mesh")
    return next(iter(groups.values()))
