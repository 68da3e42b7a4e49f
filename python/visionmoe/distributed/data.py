"""Data parallelism for the training loop: each rank's share of a global batch, evaluation padded and masked so that
its metrics are exactly those of one process, and sums all-reduced over the ranks.

Every rank draws the same seeded data order; global batch k is ``order[k * B:(k + 1) * B]`` and rank r takes the
r-th of its W equal parts, so the W ranks together see exactly the batch one process would. Training drops a last
batch of fewer than B images (W ranks cannot split it evenly, and expert parallelism needs the same number of
images on every rank); evaluation instead pads its last batch with copies of the first image and masks them out.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def routing_group_sizes(model: nn.Module) -> List[int]:
    """The ``group_size`` (images per routing group) of every MoE layer of ``model`` that routes groups."""
    sizes = []
    for module in model.modules():
        size = getattr(module, "group_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            sizes.append(size)
    return sizes


def local_batch_size(
    global_batch_size: int, world_size: int, group_sizes: Iterable[int] = (), key: str = "batch_size"
) -> int:
    """Each rank's share B / W of the global batch B, after checking that W divides B and that every MoE layer's
    ``group_size`` divides B / W (a rank routes whole groups of its own images). ``key`` names the setting in
    errors."""
    if global_batch_size % world_size:
        raise ValueError(
            f"config key {key!r} ({global_batch_size}) is the global batch, split over {world_size} "
            f"ranks: it must be divisible by the world size {world_size}"
        )
    local = global_batch_size // world_size
    for size in sorted(set(group_sizes)):
        if local % size:
            raise ValueError(
                f"config key {key!r} ({global_batch_size}) gives each of the {world_size} ranks "
                f"{local} images, which is not a multiple of an MoE layer's group_size={size}; "
                f"choose {key} divisible by {world_size * size}"
            )
    return local


def steps_per_epoch(num_samples: int, global_batch_size: int, drop_last: bool) -> int:
    """Optimiser steps in one pass over ``num_samples`` images: floor with ``drop_last``, else ceiling."""
    return num_samples // global_batch_size if drop_last else math.ceil(num_samples / global_batch_size)


def rank_training_indices(
    order: Sequence[int], global_batch_size: int, rank: int, world_size: int, drop_last: bool, skip_batches: int = 0
) -> List[int]:
    """This rank's dataset indices, batch after batch, for one epoch of the data order ``order``: of global batch
    k, ``order[k * B + r * B / W:k * B + (r + 1) * B / W]``; the first ``skip_batches`` global batches (already
    trained on before a resumption) are left out. With ``drop_last`` a last batch of fewer than B images is left
    out; without it, W must be 1."""
    if world_size > 1 and not drop_last and len(order) % global_batch_size:
        raise ValueError(
            f"{len(order)} training images do not make whole global batches of {global_batch_size}, "
            f"so {world_size} ranks cannot share the last one: training on several ranks drops it"
        )
    local = global_batch_size // world_size
    indices: List[int] = []
    for step in range(skip_batches, steps_per_epoch(len(order), global_batch_size, drop_last)):
        start = step * global_batch_size + rank * local
        indices.extend(order[start : min(start + local, (step + 1) * global_batch_size, len(order))])
    return indices


def rank_evaluation_batches(
    num_samples: int, global_batch_size: int, rank: int, world_size: int, multiple: int = 1
) -> List[Tuple[List[int], List[bool]]]:
    """This rank's share of an evaluation over ``num_samples`` images in order: a list of (indices, valid) per
    batch. Global batches of B images are split as in training; the last, of L < B images, is padded to the
    smallest multiple of W * ``multiple`` (``multiple``: the routing groups' size) with copies of image 0, which
    ``valid`` marks False so that their losses and predictions are not counted. Every rank gets the same number of
    batches of the same sizes, each of whole routing groups made of the images one process would group together,
    so the metrics summed over the ranks are exactly one process's (up to the order of floating-point additions).
    """
    batches = []
    for start in range(0, num_samples, global_batch_size):
        count = min(global_batch_size, num_samples - start)
        unit = world_size * multiple
        padded = global_batch_size if count == global_batch_size else math.ceil(count / unit) * unit
        share = padded // world_size
        positions = range(rank * share, (rank + 1) * share)
        batches.append(
            (
                [start + position if position < count else 0 for position in positions],
                [position < count for position in positions],
            )
        )
    return batches


class IndexBatchSampler(torch.utils.data.Sampler):
    """Yields the given batches of dataset indices (lists), in order: batches of unequal sizes for a DataLoader's
    ``batch_sampler``."""

    def __init__(self, indices: Sequence[int], batch_sizes: Sequence[int]):
        self.batches, start = [], 0
        for size in batch_sizes:
            self.batches.append(list(indices[start : start + size]))
            start += size

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def all_reduce_sum(values: Sequence[float], device: Optional[torch.device] = None) -> List[float]:
    """The sums over all ranks of each of ``values`` (float64; returned unchanged without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(value) for value in values]
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
