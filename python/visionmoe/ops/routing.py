"""Router assignments as routing plans: top-K token choice (with Batch Priority Routing) and expert choice.

Shape letters: G groups routed independently, T tokens per group, E experts, K experts per token, C capacity
per expert and group. Plans address E * G virtual experts numbered ``e * G + g`` (so padded expert rows
[E * G, C, D] view as [E, G * C, D]) and tokens numbered ``g * T + t``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_count, check_scores, shape_of
from ..plan import RoutingPlan

_ops = torch.ops.visionmoe


def _as_scores(name: str, scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (2, 3):
        raise ValueError(f"{name}: scores must have shape [T, E] or [G, T, E], got {shape_of(scores)}")
    return scores.unsqueeze(0) if scores.dim() == 2 else scores


def _combine_weights(name: str, scores: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return scores
    weights = weights.unsqueeze(0) if weights.dim() == 2 else weights
    if weights.shape != scores.shape:
        raise ValueError(
            f"{name}: weights must have the shape of scores {tuple(scores.shape)}, got {tuple(weights.shape)}"
        )
    if weights.device != scores.device:
        raise ValueError(f"{name}: weights must be on {scores.device} like scores, got {weights.device}")
    if not weights.is_floating_point():  # they become the plan's combine weights
        raise TypeError(f"{name}: weights must be a floating-point tensor, got {weights.dtype}")
    return weights


def _plan(outputs, weights: torch.Tensor, capacity: Optional[int], renormalize: bool) -> RoutingPlan:
    """The plan of a route operator's outputs, with combine weights gathered from ``weights`` [G, T, E] (so that
    gradients reach the router): the operator's ``flat_index`` [M] is the position ``(g * T + t) * E + e`` of each
    assignment's weight in ``weights``, in the plan's expert-major order."""
    sorted_token, sorted_expert, slot, offsets, order, flat_index, token_offsets, token_rows = outputs
    G, T, E = weights.shape
    weight = weights.reshape(-1).index_select(0, flat_index)
    if renormalize:
        totals = torch.zeros(G * T, dtype=weight.dtype, device=weight.device).index_add(0, sorted_token, weight)
        weight = weight / totals.index_select(0, sorted_token)
    return RoutingPlan(
        sorted_token=sorted_token,
        sorted_expert=sorted_expert,
        weight=weight,
        slot=slot,
        offsets=offsets,
        order=order,
        num_experts=E * G,
        capacity=capacity,
        num_groups=G,
        token_offsets=token_offsets,
        token_rows=token_rows,
    )


def topk_route(
    scores: torch.Tensor,
    k: int,
    capacity: Optional[int] = None,
    *,
    batch_priority: bool = False,
    weights: Optional[torch.Tensor] = None,
    renormalize: bool = False,
) -> RoutingPlan:
    """Top-K token choice: each token picks its K best experts; each expert keeps its first C assignments.

    Args:
        scores: [G, T, E] or [T, E] selection scores (router probabilities, or Sinkhorn-balanced scores).
            Ties go to the lower expert index. On the CPU non-finite scores are rejected.
        k: K, experts per token, 1 <= K <= E (K <= 16 on CUDA).
        capacity: C, slots per expert and group; None keeps every assignment (dropless).
        batch_priority: fill order. False: by token position. True (Batch Priority Routing, V-MoE): tokens by
            their best score, highest first (ties by position). In both, every token's first choice is placed
            before any second choice, so capacity drops later choices first.
        weights: [G, T, E] or [T, E] scores the combine weights are gathered from (default: ``scores``), e.g.
            softmax probabilities when ``scores`` are Sinkhorn-balanced. Gradients flow to them.
        renormalize: divide each token's K weights by their sum (taken before the capacity drops any).

    Returns:
        A :class:`~visionmoe.RoutingPlan` over E * G virtual experts with its token-major view.
    """
    scores = _as_scores("topk_route", scores)
    weights = _combine_weights("topk_route", scores, weights)
    check_count("topk_route", "capacity", capacity, optional=True)
    outputs = _ops.topk_route(scores, k, batch_priority)
    return _plan(outputs, weights, capacity, renormalize)


def expert_choice_route(scores: torch.Tensor, capacity: int, *, weights: Optional[torch.Tensor] = None) -> RoutingPlan:
    """Expert choice (Zhou et al. 2022): each expert picks the C tokens of its group it scores highest.

    Args:
        scores: [G, T, E] or [T, E] selection scores; ties go to the lower token index.
        capacity: C, tokens per expert and group. With C > T an expert takes all T tokens and its remaining
            slots stay empty. A token may be chosen by several experts or by none.
        weights: [G, T, E] or [T, E] combine weights to gather (default: ``scores``).

    Returns:
        A :class:`~visionmoe.RoutingPlan` over E * G virtual experts, capacity C, nothing dropped.
    """
    scores = _as_scores("expert_choice_route", scores)
    weights = _combine_weights("expert_choice_route", scores, weights)
    check_count("expert_choice_route", "capacity", capacity)
    outputs = _ops.expert_choice_route(scores, capacity)
    return _plan(outputs, weights, capacity, renormalize=False)


def _fake_plan(scores, num_assignments, num_virtual_experts, num_tokens):
    def index(n):
        return scores.new_empty((n,), dtype=torch.long)

    M = num_assignments
    return (
        index(M),
        index(M),
        index(M),
        index(num_virtual_experts + 1),
        index(M),
        index(M),
        index(num_tokens + 1),
        index(M),
    )


@torch.library.register_fake("visionmoe::topk_route")
def _topk_route_fake(scores, k, batch_priority):
    torch._check_value(
        scores.dim() == 3, lambda: f"topk_route: scores must have shape [G, T, E], got {list(scores.shape)}"
    )
    check_scores("topk_route", scores)
    G, T, E = scores.shape
    torch._check_value(1 <= k <= E, lambda: f"topk_route: k must be in [1, E] = [1, {E}], got {k}")
    return _fake_plan(scores, G * T * k, E * G, G * T)


@torch.library.register_fake("visionmoe::expert_choice_route")
def _expert_choice_route_fake(scores, capacity):
    torch._check_value(
        scores.dim() == 3, lambda: f"expert_choice_route: scores must have shape [G, T, E], got {list(scores.shape)}"
    )
    check_scores("expert_choice_route", scores)
    torch._check_value(capacity >= 0, lambda: f"expert_choice_route: capacity must be >= 0, got {capacity}")
    G, T, E = scores.shape
    taken = torch.sym_min(capacity, T)
    return _fake_plan(scores, G * E * taken, E * G, G * T)
