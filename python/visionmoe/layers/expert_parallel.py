"""Expert parallelism's data path: an MoE layer's expert rows travel to the ranks that hold their experts and back.

Under expert parallelism (EP) over W ranks, rank j holds experts [j * E / W, (j + 1) * E / W) (E_loc = E / W of
them, see :meth:`visionmoe.layers.ExpertMLPs.shard_`). Each rank routes its own groups of tokens, dispatches them
into expert-major rows (expert e's rows contiguous, so rank j's experts are one contiguous chunk), sends chunk j to
rank j with an all-to-all, runs its local experts on the rows of every rank, and sends the outputs back with a
second all-to-all; the combine then runs on the rank that routed the tokens, so combine weights never leave it.
Both exchanges are ``torch.distributed._functional_collectives.all_to_all_single_autograd``: its backward is the
reverse all-to-all, so gradients reach the routing rank's inputs and router, and each expert's gradient on its
rank is the sum of the gradients of every EP peer's loss.

Two kinds of exchange:

- equal splits (:func:`run_experts_equal_splits`): capacity-padded rows [E, R, D] with the same R on every rank
  (capacity routers: R = G * C with the same G and C everywhere; hindsight's dropless every-token-to-every-expert
  plan: R = G * T; Soft MoE's slots: R = B * P). No sizes are exchanged, there is no host synchronisation, and the
  layer compiles under ``torch.compile(fullgraph=True)``.
- variable splits (:func:`run_experts_variable_splits`): dropless packed rows. The per-expert counts are exchanged
  with one all-to-all and copied to the host once per layer (the one device-to-host synchronisation of the
  dropless EP path: the all-to-all needs its split sizes on the host).

Shape letters (README, "Shape letters"): E experts, W ranks of the EP group, E_loc = E / W, R rows per expert and
rank, D width, G groups, T tokens per group, C capacity, M assignments.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

# Set to 1 to check, at every EP layer's forward, that the ranks of the EP group agree on the layer and the shapes
# (an all-gather of small Python objects: a host synchronisation, so off by default).
DEBUG_ENV = "VISIONMOE_DISTRIBUTED_DEBUG"


def debug_enabled(flag: Optional[bool] = None) -> bool:
    """The EP consistency check's switch: ``flag`` when given, else the environment variable
    ``VISIONMOE_DISTRIBUTED_DEBUG`` (on unless empty or "0")."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def check_ranks_agree(group: dist.ProcessGroup, layer: str, **sizes: int) -> None:
    """Raises ValueError on every rank of ``group`` unless all of them are at the same layer with the same sizes.

    Ranks of an EP group exchange rows layer by layer; a rank with a different number of groups or tokens, or one
    that runs the layers in another order, would otherwise exchange wrongly sized buffers (a silent wrong result
    with equal splits) or hang. Skipped while ``torch.compile`` traces (it synchronises with the host)."""
    if torch.compiler.is_compiling():
        return
    mine = (layer, tuple(sizes.items()))
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        ranks = dist.get_process_group_ranks(group)
        described = "; ".join(
            f"rank {rank}: layer {name!r}, " + ", ".join(f"{key}={value}" for key, value in values)
            for rank, (name, values) in zip(ranks, everyone)
        )
        raise ValueError(
            "expert-parallel ranks disagree on an MoE layer's inputs (every rank of an EP group must "
            "run the same MoE layers in the same order on the same number of groups of the same number "
            f"of tokens): {described}"
        )


def _exchange(
    rows: torch.Tensor,
    output_splits: Optional[Sequence[int]],
    input_splits: Optional[Sequence[int]],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    return all_to_all_single_autograd(rows.contiguous(), output_splits, input_splits, group)


def run_experts_equal_splits(experts, rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's expert-major rows [E, R, D] through the experts held across ``group``: [E, R, D] -> [E, R, D].

    ``experts`` is an :class:`~visionmoe.layers.ExpertMLPs` sharded over ``group``; R must be the same on every
    rank. Rows of expert e come back to the rank that sent them, in the order it sent them.
    """
    E, R, D = rows.shape
    W = dist.get_world_size(group)
    local = E // W
    # Rank j receives [W, E_loc, R, D] (source-major); the local experts want [E_loc, W * R, D].
    received = _exchange(rows.reshape(E * R, D), None, None, group)
    expert_rows = received.view(W, local, R, D).transpose(0, 1).reshape(local, W * R, D)
    out = experts(expert_rows)
    send_back = out.view(local, W, R, D).transpose(0, 1).reshape(W * local * R, D)
    return _exchange(send_back, None, None, group).view(E, R, D)


def run_experts_variable_splits(
    experts, rows: torch.Tensor, expert_counts: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Packed expert-major rows [M, D] (expert e's ``expert_counts[e]`` rows contiguous, all E experts) through the
    experts held across ``group``: [M, D] -> [M, D], each row back on its rank in its place.

    The counts are exchanged with an all-to-all and copied to the host once (the split sizes), so this path
    synchronises with the host once per layer and does not compile without a graph break.
    """
    E = expert_counts.shape[0]
    W = dist.get_world_size(group)
    local = E // W
    counts = expert_counts.to(torch.int64).contiguous()
    received_counts = torch.empty_like(counts)  # [W * E_loc]: (source rank, local expert)
    dist.all_to_all_single(received_counts, counts, group=group)
    host = torch.cat([counts, received_counts]).tolist()  # the one device-to-host copy
    send_counts, receive_counts = host[:E], host[E:]
    input_splits = [sum(send_counts[j * local : (j + 1) * local]) for j in range(W)]
    output_splits = [sum(receive_counts[s * local : (s + 1) * local]) for s in range(W)]
    received = _exchange(rows, output_splits, input_splits, group)  # [M, D], source-major
    received_rows = received.shape[0]
    # Reorder (source, expert) chunks into (expert, source) order so that each local expert's rows are contiguous.
    chunk = torch.repeat_interleave(
        torch.arange(W * local, device=rows.device), received_counts, output_size=received_rows
    )
    perm = torch.argsort((chunk % local) * W + chunk // local, stable=True)
    per_expert = received_counts.view(W, local).sum(0)
    offsets = torch.cat([per_expert.new_zeros(1), per_expert.cumsum(0)])
    out = experts(received.index_select(0, perm), expert_offsets=offsets)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(received_rows, device=perm.device)
    return _exchange(out.index_select(0, inverse), input_splits, output_splits, group)
