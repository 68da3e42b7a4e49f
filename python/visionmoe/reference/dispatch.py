"""Pure-PyTorch references for routing plans, dispatch and combine: the readable spec and the test oracle.

Same signatures as :mod:`visionmoe.ops.dispatch`. Two formulations are given: the index formulation
(``index_select``/``index_add_``, the spec) and the one-hot einsum formulation of GShard, DeepSpeed-MoE and
V-MoE (``dispatch_einsum``/``combine_einsum``), which materialises a dense [T, E, C] tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_floating, check_make_plan
from ..plan import RoutingPlan


def make_plan(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    *,
    num_tokens: Optional[int] = None,
    validate: bool = True,
) -> RoutingPlan:
    """Reference of :func:`visionmoe.ops.make_plan`: a stable sort by expert, then ranks within experts."""
    check_make_plan("make_plan", token_index, expert_index, num_experts, num_tokens)
    return build_plan(
        token_index, expert_index, weight, num_experts, capacity, num_tokens=num_tokens, validate=validate
    )


def build_plan(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    *,
    num_tokens: Optional[int] = None,
    validate: bool = True,
) -> RoutingPlan:
    """make_plan without its argument checks, for the routers' references, whose plans are well formed by
    construction and may have no experts at all (G = 0 groups), as the routing operators' internal plans may."""
    if capacity is not None and capacity < 0:
        raise ValueError(f"make_plan: capacity must be >= 0 or None (dropless), got {capacity}")
    if validate:
        if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= num_experts):
            raise ValueError(f"make_plan: expert_index out of range: expected values in [0, {num_experts})")
        if token_index.numel() and token_index.min() < 0:
            raise ValueError("make_plan: token_index out of range: expected values >= 0")
        if num_tokens is not None and token_index.numel() and token_index.max() >= num_tokens:
            raise ValueError(f"make_plan: token_index out of range: expected values in [0, {num_tokens})")
    order = torch.sort(expert_index, stable=True).indices
    sorted_expert = expert_index[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slot = torch.arange(order.shape[0], device=order.device) - offsets[sorted_expert]
    token_offsets = token_rows = None
    sorted_token = token_index[order]
    if num_tokens is not None:
        token_offsets, token_rows = token_major(sorted_token, num_tokens)
    return RoutingPlan(
        sorted_token=sorted_token,
        sorted_expert=sorted_expert,
        weight=weight[order],
        slot=slot,
        offsets=offsets,
        order=order,
        num_experts=num_experts,
        capacity=capacity,
        token_offsets=token_offsets,
        token_rows=token_rows,
    )


def token_major(sorted_token: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.visionmoe.token_major``: per token, its assignments in increasing order."""
    tokens, rows = torch.sort(sorted_token, stable=True)
    token_offsets = torch.searchsorted(tokens, torch.arange(num_tokens + 1, device=tokens.device))
    return token_offsets, rows


def _rows_of_assignments(plan: RoutingPlan, layout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row of every assignment in the layout (dropped ones point at an extra row past the end), the kept
    mask, and the number of real rows."""
    kept = plan.kept()
    if layout == "padded":
        num_rows = plan.num_experts * plan.capacity
        rows = plan.sorted_expert * plan.capacity + plan.slot
    else:
        num_rows = plan.num_assignments
        rows = torch.arange(num_rows, device=plan.slot.device)
    return torch.where(kept, rows, num_rows), kept, num_rows


def dispatch(x: torch.Tensor, plan: RoutingPlan, layout: str = "padded") -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.dispatch`, with ``index_select`` and ``index_add_``."""
    if x.dim() != 2:
        raise ValueError(f"dispatch: x must have shape [T, D], got {tuple(x.shape)}")
    check_floating("dispatch", "x", x)
    if layout == "padded" and plan.capacity is None:
        raise ValueError("dispatch: the padded layout needs a capacity; a dropless plan uses layout='packed'")
    rows, _, num_rows = _rows_of_assignments(plan, layout)
    out = x.new_zeros((num_rows + 1, x.shape[1])).index_add(0, rows, x.index_select(0, plan.sorted_token))
    out = out[:num_rows]
    return out.view(plan.num_experts, plan.capacity, x.shape[1]) if layout == "padded" else out


def combine(expert_out: torch.Tensor, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.combine`, with ``index_select`` and ``index_add_``."""
    layout = "padded" if expert_out.dim() == 3 else "packed"
    rows, kept, _ = _rows_of_assignments(plan, layout)
    flat = expert_out.flatten(0, -2)  # not reshape(-1, D), which is ambiguous for D = 0
    flat = torch.cat([flat, flat.new_zeros((1, flat.shape[1]))])
    weight = torch.where(kept, plan.weight.to(expert_out.dtype), 0)
    contributions = flat.index_select(0, rows) * weight[:, None]
    return expert_out.new_zeros((num_tokens, flat.shape[1])).index_add(0, plan.sorted_token, contributions)


def combine_tensor(plan: RoutingPlan, num_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [T, E, C] combine tensor of GShard-style MoE: weight at (token, expert, slot) of kept
    assignments, zero elsewhere. Its non-zero pattern is the dispatch mask."""
    kept = plan.kept()
    dense = torch.zeros((num_tokens, plan.num_experts, plan.capacity), dtype=dtype, device=plan.weight.device)
    index = (plan.sorted_token[kept], plan.sorted_expert[kept], plan.slot[kept])
    return dense.index_put(index, plan.weight[kept].to(dtype), accumulate=True)


def dispatch_einsum(x: torch.Tensor, dispatch_mask: torch.Tensor) -> torch.Tensor:
    """GShard/V-MoE dispatch: [T, D] x [T, E, C] one-hot mask -> [E, C, D]."""
    return torch.einsum("td,tec->ecd", x, dispatch_mask.to(x.dtype))


def combine_einsum(expert_out: torch.Tensor, combine_weights: torch.Tensor) -> torch.Tensor:
    """GShard/V-MoE combine: [E, C, D] x [T, E, C] combine tensor -> [T, D]."""
    return torch.einsum("ecd,tec->td", expert_out, combine_weights.to(expert_out.dtype))
