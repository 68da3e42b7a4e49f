"""Routing plans, expert dispatch and combine: thin wrappers over ``torch.ops.visionmoe``.

Shape letters: T tokens, D width, E experts, C capacity, M assignments. The fake kernels and autograd
formulas of the operators are registered here, so the operators work under ``torch.compile`` and autograd.

The operators assume a consistent plan: ``offsets`` rises from 0 to M; ``sorted_expert[a]`` is the expert whose
segment ``offsets[e]:offsets[e + 1]`` holds ``a`` and ``slot[a] = a - offsets[sorted_expert[a]]``; every
``sorted_token`` is in [0, T); ``token_rows[token_offsets[t]:token_offsets[t + 1]]`` lists token t's assignments
in increasing order. :func:`make_plan` and the routers make such plans. The raw operators
``torch.ops.visionmoe.dispatch`` and ``combine`` check it only with ``validate=True`` (their default is False;
the wrappers here default to True); an inconsistent plan then gives unspecified values, but no operator reads or
writes outside its tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_count, check_floating, check_make_plan, check_same_device, shape_of
from ..plan import RoutingPlan

_ops = torch.ops.visionmoe

LAYOUTS = ("padded", "packed")


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
    """Builds a routing plan from explicit assignments.

    Args:
        token_index: [M] int64, the token of each assignment.
        expert_index: [M] int64, the expert of each assignment, in [0, E).
        weight: [M] float, the combine weight of each assignment (gradients flow back to it).
        num_experts: E.
        capacity: C, the slots per expert: each expert keeps its first C assignments in the given order (so
            list assignments in priority order) and drops the rest. None keeps every assignment (dropless).
        num_tokens: T. When given, token indices are checked against it and the plan carries its token-major
            view, which combine and dispatch's backward then reuse instead of rebuilding.
        validate: check that indices are in range. On CUDA this costs one device-to-host synchronisation;
            callers whose indices are valid by construction (the routers) pass False.

    Grouping by expert is a stable counting sort on the tensors' device; no host synchronisation happens
    unless ``validate`` is set on CUDA.
    """
    check_count("make_plan", "capacity", capacity, optional=True)
    check_count("make_plan", "num_tokens", num_tokens, optional=True)
    if capacity is not None:
        capacity = int(capacity)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != token_index.shape[0]:
        raise ValueError(f"make_plan: weight must have shape [M] = [{token_index.shape[0]}], got {shape_of(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"make_plan: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != token_index.device:
        raise ValueError(f"make_plan: weight must be on {token_index.device} like token_index, got {weight.device}")
    order, sorted_token, sorted_expert, slot, offsets = _ops.make_plan(
        token_index, expert_index, num_experts, num_tokens, validate
    )
    token_offsets = token_rows = None
    if num_tokens is not None:
        token_offsets, token_rows = _ops.token_major(sorted_token, num_tokens)
    return RoutingPlan(
        sorted_token=sorted_token,
        sorted_expert=sorted_expert,
        weight=weight.index_select(0, order),
        slot=slot,
        offsets=offsets,
        order=order,
        num_experts=num_experts,
        capacity=capacity,
        token_offsets=token_offsets,
        token_rows=token_rows,
    )


def _check_device(op: str, name: str, tensor: torch.Tensor, plan: RoutingPlan) -> None:
    if tensor.device != plan.sorted_token.device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but the plan is on {plan.sorted_token.device}")


def _token_view(plan: RoutingPlan, num_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.token_offsets is not None:
        return plan.token_offsets, plan.token_rows
    return _ops.token_major(plan.sorted_token, num_tokens)


def dispatch(x: torch.Tensor, plan: RoutingPlan, layout: str = "padded", *, validate: bool = True) -> torch.Tensor:
    """Gathers each kept assignment's token into its expert's rows.

    Args:
        x: [T, D] token features.
        plan: the routing plan.
        layout: ``"padded"`` returns [E, C, D] (empty slots zero; needs a capacity); ``"packed"`` returns
            [M, D] in the plan's expert-major order (dropped assignments' rows zero).
        validate: check that the plan is consistent (offsets rise from 0 to M, sorted_expert and slot agree
            with them, token indices are in [0, T), the token-major view lists each token's assignments) and raise a
            ValueError naming what is not. On CUDA this costs one device-to-host synchronisation; callers whose
            plans are consistent by construction (those of :func:`make_plan`, :func:`topk_route` and
            :func:`expert_choice_route`, unmodified) may pass False. An inconsistent plan then gives unspecified
            values, though never a read or write outside the tensors.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"dispatch: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "padded" and plan.capacity is None:
        raise ValueError("dispatch: the padded layout needs a capacity; a dropless plan uses layout='packed'")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"dispatch: x must have shape [T, D], got {shape_of(x)}")
    _check_device("dispatch", "x", x, plan)
    token_offsets, token_rows = _token_view(plan, x.shape[0])
    return _ops.dispatch(
        x,
        plan.sorted_token,
        plan.sorted_expert,
        plan.slot,
        plan.offsets,
        token_offsets,
        token_rows,
        plan.capacity,
        layout == "padded",
        validate,
    )


def combine(expert_out: torch.Tensor, plan: RoutingPlan, num_tokens: int, *, validate: bool = True) -> torch.Tensor:
    """Mixes expert outputs back into tokens: ``y[t] = sum of weight[a] * expert_out[row(a)]``.

    Args:
        expert_out: [E, C, D] (padded) or [M, D] (packed) expert outputs, as produced from :func:`dispatch`.
        plan: the routing plan; its weights are cast to ``expert_out``'s dtype.
        num_tokens: T.
        validate: check the plan first, as :func:`dispatch` does.

    Returns:
        [T, D]; a token whose assignments were all dropped gets zeros.
    """
    if not isinstance(expert_out, torch.Tensor):
        raise ValueError(f"combine: expert_out must be a tensor, got {shape_of(expert_out)}")
    check_count("combine", "num_tokens", num_tokens)
    _check_device("combine", "expert_out", expert_out, plan)
    if plan.token_offsets is not None and plan.num_tokens != num_tokens:
        raise ValueError(f"combine: num_tokens={num_tokens} but the plan was made for {plan.num_tokens} tokens")
    token_offsets, token_rows = _token_view(plan, num_tokens)
    return _ops.combine(
        expert_out,
        plan.weight.to(expert_out.dtype),
        plan.sorted_token,
        plan.sorted_expert,
        plan.slot,
        plan.offsets,
        token_offsets,
        token_rows,
        plan.capacity,
        validate,
    )


# ---- fake kernels: output shapes and dtypes without running anything ----


def _check_plan_devices(
    op, like_name, like, sorted_token, sorted_expert, slot, offsets, token_offsets=None, token_rows=None
):
    check_same_device(
        op,
        like_name,
        like,
        sorted_token=sorted_token,
        sorted_expert=sorted_expert,
        slot=slot,
        offsets=offsets,
        token_offsets=token_offsets,
        token_rows=token_rows,
    )


@torch.library.register_fake("visionmoe::make_plan")
def _make_plan_fake(token_index, expert_index, num_experts, num_tokens=None, validate=True):
    check_make_plan("make_plan", token_index, expert_index, num_experts, num_tokens)
    n = token_index.shape[0]
    index = [token_index.new_empty((n,)) for _ in range(4)]
    return (*index, token_index.new_empty((num_experts + 1,)))


@torch.library.register_fake("visionmoe::token_major")
def _token_major_fake(sorted_token, num_tokens):
    return sorted_token.new_empty((num_tokens + 1,)), sorted_token.new_empty(sorted_token.shape)


@torch.library.register_fake("visionmoe::dispatch")
def _dispatch_fake(
    x, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows, capacity, padded, validate=False
):
    torch._check_value(x.dim() == 2, lambda: f"dispatch: x must have shape [T, D], got {tuple(x.shape)}")
    check_floating("dispatch", "x", x)
    _check_plan_devices("dispatch", "x", x, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows)
    if padded:
        torch._check_value(capacity is not None, lambda: "dispatch: the padded layout needs a capacity")
        return x.new_empty((offsets.shape[0] - 1, capacity, x.shape[1]))
    return x.new_empty((sorted_token.shape[0], x.shape[1]))


@torch.library.register_fake("visionmoe::dispatch_backward")
def _dispatch_backward_fake(grad_out, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows, capacity):
    _check_plan_devices(
        "dispatch_backward", "grad_out", grad_out, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows
    )
    return grad_out.new_empty((token_offsets.shape[0] - 1, grad_out.shape[-1]))


@torch.library.register_fake("visionmoe::combine")
def _combine_fake(
    expert_out, weight, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows, capacity, validate=False
):
    check_same_device("combine", "expert_out", expert_out, weight=weight)
    _check_plan_devices(
        "combine", "expert_out", expert_out, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows
    )
    return expert_out.new_empty((token_offsets.shape[0] - 1, expert_out.shape[-1]))


@torch.library.register_fake("visionmoe::combine_backward")
def _combine_backward_fake(grad_y, expert_out, weight, sorted_token, sorted_expert, slot, offsets, capacity):
    check_same_device("combine_backward", "expert_out", expert_out, grad_y=grad_y, weight=weight)
    _check_plan_devices("combine_backward", "expert_out", expert_out, sorted_token, sorted_expert, slot, offsets)
    return torch.empty_like(expert_out), torch.empty_like(weight)


# ---- autograd: the backward passes are operators too ----


def _setup_dispatch(ctx, inputs, output):
    x, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows, capacity, padded, _ = inputs
    ctx.save_for_backward(sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows)
    ctx.capacity = capacity


def _dispatch_backward(ctx, grad_out):
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.dispatch_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.capacity)
    return grad_x, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("visionmoe::dispatch", _dispatch_backward, setup_context=_setup_dispatch)


def _setup_combine(ctx, inputs, output):
    expert_out, weight, sorted_token, sorted_expert, slot, offsets, token_offsets, token_rows, capacity, _ = inputs
    ctx.save_for_backward(expert_out, weight, sorted_token, sorted_expert, slot, offsets)
    ctx.capacity = capacity


def _combine_backward(ctx, grad_y):
    expert_out, weight, sorted_token, sorted_expert, slot, offsets = ctx.saved_tensors
    grad_expert_out = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_expert_out, grad_weight = _ops.combine_backward(
            grad_y.contiguous(), expert_out, weight, sorted_token, sorted_expert, slot, offsets, ctx.capacity
        )
    return grad_expert_out, grad_weight, None, None, None, None, None, None, None, None


torch.library.register_autograd("visionmoe::combine", _combine_backward, setup_context=_setup_combine)
