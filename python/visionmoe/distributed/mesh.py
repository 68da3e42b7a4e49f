"""The (data-parallel, expert-parallel) device mesh, built from the launcher's environment (torchrun)."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "ep")


def default_backend(device_type: str) -> str:
    """NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_mesh(expert_parallel: int = 1, device_type: Optional[str] = None, backend: Optional[str] = None) -> DeviceMesh:
    """The device mesh of shape (W / expert_parallel, expert_parallel) with dimensions ("dp", "ep").

    Ranks of one expert-parallel group are contiguous (rank = dp_index * expert_parallel + ep_index), so with
    torchrun's rank order an EP group stays inside a node when ``expert_parallel`` divides the GPUs per node and
    the all-to-all runs over NVLink. The default process group is started from the environment torchrun sets
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless one already exists.

    Args:
        expert_parallel: EP, the number of ranks one MoE layer's experts are spread over; it must divide the world
            size W. 1 is plain data parallelism.
        device_type: "cuda" or "cpu"; default "cuda" when a GPU is visible. On CUDA each rank uses the GPU of its
            LOCAL_RANK.
        backend: default NCCL on CUDA, gloo on the CPU.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend or default_backend(device_type))
    return _mesh(dist.get_world_size(), expert_parallel, device_type)


def mesh_from_process_groups(expert_parallel: int, device_type: str = "cpu") -> DeviceMesh:
    """The mesh of :func:`init_mesh` over an already initialised default process group (tests, notebooks)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "mesh_from_process_groups needs an initialised default process group (torch.distributed.init_process_group)"
        )
    return _mesh(dist.get_world_size(), expert_parallel, device_type)


def _mesh(world_size: int, expert_parallel: int, device_type: str) -> DeviceMesh:
    if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be a positive integer, got {expert_parallel!r}")
    if world_size % expert_parallel:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // expert_parallel, expert_parallel), mesh_dim_names=MESH_DIMS)
