"""Pure-PyTorch references of the router assignment operators (same signatures as visionmoe.ops.routing)."""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_scores
from ..plan import RoutingPlan
from .dispatch import build_plan


def _groups(scores: torch.Tensor) -> torch.Tensor:
    return scores.unsqueeze(0) if scores.dim() == 2 else scores


def _finish(
    plan: RoutingPlan, list_source: torch.Tensor, weights: torch.Tensor, capacity, renormalize: bool, num_groups: int
) -> RoutingPlan:
    G, T, E = weights.shape
    flat_index = plan.sorted_token * E + torch.div(plan.sorted_expert, num_groups, rounding_mode="floor")
    weight = weights.reshape(-1)[flat_index]
    if renormalize:
        totals = torch.zeros(G * T, dtype=weight.dtype, device=weight.device).index_add(0, plan.sorted_token, weight)
        weight = weight / totals[plan.sorted_token]
    return RoutingPlan(
        sorted_token=plan.sorted_token,
        sorted_expert=plan.sorted_expert,
        weight=weight,
        slot=plan.slot,
        offsets=plan.offsets,
        order=list_source[plan.order],
        num_experts=E * G,
        capacity=capacity,
        num_groups=G,
        token_offsets=plan.token_offsets,
        token_rows=plan.token_rows,
    )


def topk_route(
    scores, k, capacity=None, *, batch_priority=False, weights: Optional[torch.Tensor] = None, renormalize=False
) -> RoutingPlan:
    """Reference of :func:`visionmoe.ops.topk_route`: stable sorts, then :func:`make_plan`."""
    check_scores("topk_route", scores)
    scores = _groups(scores)
    weights = scores if weights is None else _groups(weights)
    G, T, E = scores.shape
    if not 1 <= k <= E:
        raise ValueError(f"topk_route: k must be in [1, E] = [1, {E}], got {k}")
    # A stable descending sort puts the lower expert first among equal scores.
    choices = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]  # [G, T, K]
    positions = torch.arange(T, device=scores.device).expand(G, T)
    if batch_priority:
        best = scores.gather(-1, choices[..., :1]).squeeze(-1)  # [G, T]
        rank_to_token = torch.sort(best, dim=1, descending=True, stable=True).indices
    else:
        rank_to_token = positions
    choices_by_rank = choices.gather(1, rank_to_token.unsqueeze(-1).expand(G, T, k)).permute(2, 0, 1)  # [K, G, T]
    group_base = torch.arange(G, device=scores.device).view(1, G, 1)
    tokens = (rank_to_token.unsqueeze(0) + group_base * T).expand(k, G, T)
    virtual_experts = choices_by_rank * G + group_base
    plan = build_plan(
        tokens.reshape(-1), virtual_experts.reshape(-1), torch.zeros(tokens.numel()), E * G, capacity, num_tokens=G * T
    )
    list_source = (tokens + torch.arange(k, device=scores.device).view(k, 1, 1) * G * T).reshape(-1)
    return _finish(plan, list_source, weights, capacity, renormalize, G)


def expert_choice_route(scores, capacity, *, weights: Optional[torch.Tensor] = None) -> RoutingPlan:
    """Reference of :func:`visionmoe.ops.expert_choice_route`: a stable sort of every expert's column."""
    check_scores("expert_choice_route", scores)
    if capacity < 0:
        raise ValueError(f"expert_choice_route: capacity must be >= 0, got {capacity}")
    scores = _groups(scores)
    weights = scores if weights is None else _groups(weights)
    G, T, E = scores.shape
    taken = min(capacity, T)
    tokens = torch.sort(scores.transpose(1, 2), dim=2, descending=True, stable=True).indices[..., :taken]
    group_base = torch.arange(G, device=scores.device).view(1, G, 1)
    tokens = (tokens.permute(1, 0, 2) + group_base * T).reshape(-1)  # expert-major over e * G + g
    virtual_experts = torch.arange(E * G, device=scores.device).repeat_interleave(taken)
    plan = build_plan(tokens, virtual_experts, torch.zeros(tokens.numel()), E * G, capacity, num_tokens=G * T)
    return _finish(plan, torch.arange(tokens.numel(), device=scores.device), weights, capacity, False, G)
