"""Mixture-of-Experts MLP layers: drop-in replacements for a transformer block's MLP.

Shape letters: B images, N tokens per image, D width, F expert hidden width, E experts, G groups routed
independently, T tokens per group, C capacity, P slots per expert (Soft MoE).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..routers import RouterMetrics, create_router
from ..routers.checks import check_choice, check_input_dtype, check_int
from ..routers.hindsight import HindsightRouter
from . import expert_parallel

# The activations the expert operator implements.
ACTIVATIONS = ops.ACTIVATIONS


class ExpertMLPs(nn.Module):
    """E independent MLPs, Linear(D -> F) -> activation -> Linear(F -> D), stored as stacked weights
    w1 [E, D, F'] (F' = 2F for "silu_gated": gate then value), b1 [E, F'], w2 [E, F, D], b2 [E, D].

    ``forward(x [E, R, D]) -> [E, R, D]`` runs expert e on rows x[e] (capacity-padded layout);
    ``forward(x [M, D], expert_offsets [E + 1])`` on the packed rows ``expert_offsets[e]:expert_offsets[e + 1]``.
    Both run :func:`visionmoe.ops.expert_mlp` (bias and activation fused, the pre-activation kept for backward).

    Under expert parallelism (:meth:`shard_`) the module keeps only its rank's experts: the parameters hold
    ``num_local_experts`` rows starting at global expert ``first_expert``, while ``num_experts`` stays E.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = (
            check_int(name, value, 1)
            for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim))
        )
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        first = 2 * self.hidden_dim if activation == "silu_gated" else self.hidden_dim
        self.w1 = nn.Parameter(torch.empty(self.num_experts, self.dim, first))
        self.b1 = nn.Parameter(torch.empty(self.num_experts, first))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.dim))
        self.b2 = nn.Parameter(torch.empty(self.num_experts, self.dim))
        self.expert_group: Optional[dist.ProcessGroup] = None
        self.num_local_experts, self.first_expert = self.num_experts, 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # As nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, per expert. A shard draws
        # all E experts and keeps its own, so that it holds exactly what one process would with the same seed.
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        for weight, bias, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            for parameter in (weight, bias):
                full = torch.empty(
                    (self.num_experts,) + parameter.shape[1:], dtype=parameter.dtype, device=parameter.device
                )
                parameter.copy_(nn.init.uniform_(full, -bound, bound)[local])

    @torch.no_grad()
    def shard_(self, group: dist.ProcessGroup) -> "ExpertMLPs":
        """Expert parallelism: keeps only this rank's experts, [r * E / S, (r + 1) * E / S) for rank r of the S
        ranks of ``group``, as slices of the current (full) parameters. E must be divisible by S."""
        if self.expert_group is not None:
            raise ValueError("these experts are already sharded over an expert-parallel group")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % size:
            raise ValueError(
                f"expert parallelism over {size} ranks needs E divisible by {size}, got E={self.num_experts}"
            )
        self.num_local_experts = self.num_experts // size
        self.first_expert = rank * self.num_local_experts
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, nn.Parameter(getattr(self, name)[local].clone()))
        self.expert_group = group
        return self

    @torch.no_grad()
    def load_dense_(self, fc1: nn.Linear, fc2: nn.Linear) -> "ExpertMLPs":
        """Sparse upcycling: every expert starts as a copy of the dense MLP fc2(gelu(fc1(x))).

        The building block of the upcycling entry points; users call :meth:`MoEMLP.from_dense` (one layer),
        :func:`visionmoe.models.upcycle` or :func:`visionmoe.convert.moeify` (whole models) instead."""
        if self.activation != "gelu":
            raise ValueError(
                f"load_dense_ copies a Linear-GELU-Linear MLP; this layer's activation is {self.activation!r}"
            )
        if fc1.weight.shape != (self.hidden_dim, self.dim) or fc2.weight.shape != (self.dim, self.hidden_dim):
            raise ValueError(
                f"dense MLP shapes fc1 {tuple(fc1.weight.shape)}, fc2 {tuple(fc2.weight.shape)} do not "
                f"match D={self.dim}, F={self.hidden_dim}"
            )
        self.w1.copy_(fc1.weight.t().expand_as(self.w1))
        self.w2.copy_(fc2.weight.t().expand_as(self.w2))
        self.b1.copy_(fc1.bias.expand_as(self.b1) if fc1.bias is not None else torch.zeros_like(self.b1))
        self.b2.copy_(fc2.bias.expand_as(self.b2) if fc2.bias is not None else torch.zeros_like(self.b2))
        return self

    def forward(self, x: torch.Tensor, expert_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E, R, D] (capacity-padded), or packed rows [M, D] with ``expert_offsets`` [E + 1]."""
        return ops.expert_mlp(
            x, self.w1, self.b1, self.w2, self.b2, activation=self.activation, expert_offsets=expert_offsets
        )

    def extra_repr(self) -> str:
        shard = (
            ""
            if self.expert_group is None
            else f", local experts [{self.first_expert}, {self.first_expert + self.num_local_experts})"
        )
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}{shard}"
        )


def check_tokens(x: torch.Tensor, experts: ExpertMLPs) -> None:
    """Rejects an MoE MLP's input x unless it is [B, N, D] floating-point tokens of the experts' D and dtype."""
    check_input_dtype("x", x, experts.w1.dtype)
    if x.dim() != 3 or x.shape[-1] != experts.dim:
        raise ValueError(f"x must have shape [B, N, D] with D = {experts.dim}, got {tuple(x.shape)}")


class _ExpertParallel:
    """Expert parallelism for an MoE layer whose ``experts`` is an :class:`ExpertMLPs`."""

    experts: ExpertMLPs

    def expert_parallel_(self, group: dist.ProcessGroup, *, name: Optional[str] = None, debug: Optional[bool] = None):
        """Shards this layer's experts over the expert-parallel process ``group`` (rank j of S keeps experts
        [j * E / S, (j + 1) * E / S), sliced from the current full weights; E must be divisible by S) and routes
        through them: each rank routes its own tokens and exchanges expert rows with its EP peers (see
        :mod:`visionmoe.layers.expert_parallel`). Every rank of ``group`` must call the layer on the same number
        of groups of the same number of tokens. ``name`` labels the layer in the debug check's errors; ``debug``
        switches that check on or off (default: the environment variable VISIONMOE_DISTRIBUTED_DEBUG)."""
        self.experts.shard_(group)
        self.expert_parallel_name = name if name is not None else type(self).__name__
        self.expert_parallel_debug = debug
        return self

    @property
    def expert_group(self) -> Optional[dist.ProcessGroup]:
        """The expert-parallel process group, or None in one process."""
        return self.experts.expert_group

    def _check_expert_parallel_inputs(self, **sizes: int) -> None:
        group = self.experts.expert_group
        if group is not None and expert_parallel.debug_enabled(getattr(self, "expert_parallel_debug", None)):
            expert_parallel.check_ranks_agree(
                group, getattr(self, "expert_parallel_name", type(self).__name__), **sizes
            )

    def _padded_experts(self, rows: torch.Tensor) -> torch.Tensor:
        """The experts on expert-major rows [E, R, D], locally or across the EP group."""
        group = self.experts.expert_group
        if group is None:
            return self.experts(rows)
        return expert_parallel.run_experts_equal_splits(self.experts, rows, group)


class MoEMLP(_ExpertParallel, nn.Module):
    """A sparse MoE MLP: route, dispatch, run the experts, combine. [B, N, D] -> [B, N, D].

    A drop-in replacement for a ViT block's MLP (same input and output shapes). Tokens whose assignments are
    all dropped by the capacity get zeros (the block's residual connection carries them).

    Args:
        dim: D. hidden_dim: F, each expert's hidden width. num_experts: E.
        router: a name from :func:`visionmoe.routers.list_routers` (sparse routers and "hindsight").
        activation: "gelu" or "silu_gated".
        group_size: images per routing group; None routes the whole batch as one group. V-MoE routes groups of
            images independently, and expert choice and capacity are per group.
        expert_group: an expert-parallel process group to shard the experts over (see
            :meth:`expert_parallel_`; :func:`visionmoe.distributed.parallelize` sets it for a whole model).
        **router_options: passed to the router (k, capacity_factor, batch_priority, noise_std, ...).

    Expert parallelism: with an ``expert_group`` of S ranks, each rank holds E / S experts and routes its own
    images; on every rank of the group the layer must see the same number of groups of the same size
    (``group_size`` images each; None routes each rank's local batch as one group, which is not the one-process
    routing of the global batch). Routing is per group, so with equal local batches the outputs and (with the
    gradient reduction of ``parallelize``) the gradients equal the one-process layer's on the global batch.
    Capacity routers (and hindsight) exchange fixed-size rows with no host synchronisation and compile with
    ``fullgraph=True``; dropless routing exchanges per-expert counts and copies them to the host once per layer.
    Router noise (``noise_std``) is drawn on this rank's generator for its own groups; under
    :func:`visionmoe.distributed.parallelize` each router draws the global batch's noise and keeps its rank's
    slice (``router.noise_shard``), so noisy routing then equals one process's on the global batch.

    After each forward, ``last_metrics`` holds the router's :class:`~visionmoe.routers.RouterMetrics`
    (probabilities, load, dropped fraction, auxiliary losses) and ``last_plan`` the routing plan;
    :func:`aux_losses` sums the auxiliary losses of every MoE layer in a model.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        router: str = "topk",
        *,
        activation: str = "gelu",
        group_size: Optional[int] = None,
        expert_group: Optional[dist.ProcessGroup] = None,
        **router_options,
    ):
        super().__init__()
        if router == "soft":
            raise ValueError("the soft router mixes tokens into slots; use SoftMoEMLP for it")
        self.group_size = check_int("group_size", group_size, 1, none_means="routing the whole batch as one group")
        self.router = create_router(router, dim, num_experts, **router_options)
        self.experts = ExpertMLPs(num_experts, dim, hidden_dim, activation)
        self.dim, self.num_experts = self.experts.dim, self.experts.num_experts
        self.last_metrics: Optional[RouterMetrics] = None
        self.last_plan = None
        if expert_group is not None:
            self.expert_parallel_(expert_group)

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, num_experts: int, router: str = "topk", **options) -> "MoEMLP":
        """Sparse upcycling: an MoE MLP whose experts all start as the dense MLP fc2(gelu(fc1(x))).

        Use it to upcycle one MLP of your own architecture; whole ViTs have :func:`visionmoe.models.upcycle`
        (visionmoe's own) and :func:`visionmoe.convert.moeify` (built elsewhere, in place)."""
        layer = cls(fc1.in_features, fc1.out_features, num_experts, router, **options)
        layer.experts.load_dense_(fc1, fc2)
        return layer.to(device=fc1.weight.device, dtype=fc1.weight.dtype)

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.experts)
        B, N, D = x.shape
        # An empty batch is one empty group: a plan of no groups would address no experts to dispatch to.
        if self.group_size is None or B == 0:
            return x.reshape(1, B * N, D)
        if B % self.group_size != 0:
            raise ValueError(f"the batch size {B} is not a multiple of group_size={self.group_size}")
        return x.reshape(B // self.group_size, self.group_size * N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._groups(x)
        G, T, D = groups.shape
        E = self.num_experts
        self._check_expert_parallel_inputs(groups=G, tokens_per_group=T, dim=D)
        tokens = groups.reshape(G * T, D)
        plan, metrics = self.router(groups)
        # The router's plan is consistent by construction: no validation pass (a synchronisation on CUDA).
        if plan.capacity is not None:
            # [E * G, C, D]: expert e's groups are contiguous
            rows = ops.dispatch(tokens, plan, "padded", validate=False)
            expert_out = self._padded_experts(rows.view(E, G * plan.capacity, D)).view_as(rows)
        else:
            rows = ops.dispatch(tokens, plan, "packed", validate=False)  # [M, D], expert-major
            expert_out = self._packed_experts(rows, plan)
            if hasattr(self.router, "choose"):
                plan, metrics = self.router.choose(plan, expert_out)
        self.last_plan, self.last_metrics = plan, metrics
        return ops.combine(expert_out, plan, G * T, validate=False).view_as(x)

    def _packed_experts(self, rows: torch.Tensor, plan) -> torch.Tensor:
        """Expert MLPs on the packed rows of a dropless plan: expert e's rows (all its groups) are contiguous."""
        group = self.experts.expert_group
        if group is None:
            return self.experts(rows, expert_offsets=plan.offsets[:: plan.num_groups])
        if isinstance(self.router, HindsightRouter):
            # Every token goes to every expert: E equal blocks of G * T rows, exchanged with fixed splits.
            return self._padded_experts(rows.view(self.num_experts, -1, rows.shape[-1])).view_as(rows)
        return expert_parallel.run_experts_variable_splits(self.experts, rows, plan.expert_counts(), group)


class SoftMoEMLP(_ExpertParallel, nn.Module):
    """A Soft MoE MLP (Puigcerver et al. 2023): each image's tokens are mixed into E * P slots, expert e runs on
    its P slots of every image, and the outputs are mixed back into the tokens. [B, N, D] -> [B, N, D].

    Args:
        dim: D. hidden_dim: F. num_experts: E. slots_per_expert: P.
        activation: "gelu" or "silu_gated". **router_options: for the "soft" router (noise_std, ...).
        expert_group: an expert-parallel process group to shard the experts over (see :meth:`expert_parallel_`).
            Each rank mixes its own images into slots and sends expert e's slots [B * P, D] to the rank holding
            e (fixed sizes: every rank of the group must see the same B and N).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        *,
        activation: str = "gelu",
        expert_group: Optional[dist.ProcessGroup] = None,
        **router_options,
    ):
        super().__init__()
        self.router = create_router("soft", dim, num_experts, slots_per_expert=slots_per_expert, **router_options)
        self.experts = ExpertMLPs(num_experts, dim, hidden_dim, activation)
        self.dim, self.num_experts = self.experts.dim, self.experts.num_experts
        self.last_metrics: Optional[RouterMetrics] = None
        if expert_group is not None:
            self.expert_parallel_(expert_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.experts)
        self._check_expert_parallel_inputs(images=x.shape[0], tokens=x.shape[1], dim=x.shape[2])
        plan, self.last_metrics = self.router(x)
        if x.shape[1] == 0:
            # No token to mix into the slots (their softmax over the tokens is undefined) and none to output.
            return torch.zeros_like(x)
        slots = plan.dispatch(x)  # [B, E, P, D]
        B, E, P, D = slots.shape
        expert_out = self._padded_experts(slots.transpose(0, 1).reshape(E, B * P, D))
        return plan.combine(expert_out.view(E, B, P, D).transpose(0, 1))


def aux_losses(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The auxiliary losses of the last forward pass, summed by name over every MoE layer of ``model``."""
    totals: Dict[str, torch.Tensor] = {}
    for module in model.modules():
        metrics = getattr(module, "last_metrics", None)
        if isinstance(metrics, RouterMetrics):
            for name, value in metrics.aux_losses.items():
                totals[name] = totals[name] + value if name in totals else value
    return totals
