"""Grouped expert MLPs: thin wrapper over ``torch.ops.visionmoe.expert_mlp``.

Shape letters: E experts, C capacity (slots per expert), M packed rows, D width, F hidden width. Every expert e
applies ``Linear(D -> F) -> activation -> Linear(F -> D)`` to its own rows, with weights w1 [E, D, F'],
b1 [E, F'], w2 [E, F, D], b2 [E, D]. ``activation`` is ``"gelu"`` (exact erf GELU, as ``nn.GELU()``; F' = F) or
``"silu_gated"`` (SwiGLU; F' = 2F: the first F columns of ``x w1 + b1`` are the gate g, the last F the value u,
and the hidden activation is ``silu(g) * u``).

Layouts:
  padded  x [E, C, D] -> y [E, C, D]: expert e's rows are x[e] (a batched GEMM; empty slots are zero rows whose
          outputs the combine ignores);
  packed  x [M, D] with expert_offsets [E + 1] int64 on x's device -> y [M, D]: expert e's rows are
          x[expert_offsets[e]:expert_offsets[e + 1]] (offsets[0] = 0, non-decreasing, offsets[E] = M).
On CPU the offsets are read and checked; on CUDA they stay on the device and are not checked (bfloat16 runs
torch's grouped GEMM without a host synchronisation; other dtypes copy the offsets to the host once per call).

Autograd saves x, the weights and the pre-activation ``x w1 + b1`` [rows, F'] and recomputes the activation in
the backward operator, which returns the gradients of x and of all four weights. float16 and bfloat16 GEMMs
accumulate in float32 and the activation is computed in float32. Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_expert_mlp, check_expert_mlp_biases, check_like_x

_ops = torch.ops.visionmoe


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    activation: str = "gelu",
    expert_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every expert's MLP on its rows: ``y = act(x w1[e] + b1[e]) w2[e] + b2[e]``.

    Args:
        x: padded [E, C, D] or packed [M, D] rows (float32, float64, float16 or bfloat16).
        w1: [E, D, F'] first-layer weights (F' = F, or 2F for ``"silu_gated"``); b1: [E, F'].
        w2: [E, F, D] second-layer weights; b2: [E, D]. All of x's dtype and device.
        activation: ``"gelu"`` or ``"silu_gated"``.
        expert_offsets: [E + 1] int64 on x's device for packed x; must be None for padded x.

    Returns:
        y with x's shape.
    """
    y, _ = _ops.expert_mlp(x, w1, b1, w2, b2, expert_offsets, activation)
    return y


# ---- fake kernels: output shapes and dtypes without running anything ----


@torch.library.register_fake("visionmoe::expert_mlp")
def _expert_mlp_fake(x, w1, b1, w2, b2, expert_offsets, activation):
    pre_width, _ = check_expert_mlp("expert_mlp", x, w1, w2, expert_offsets, activation)
    check_expert_mlp_biases("expert_mlp", x, w1, b1, b2, pre_width)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], pre_width))


@torch.library.register_fake("visionmoe::expert_mlp_backward")
def _expert_mlp_backward_fake(grad_y, x, w1, w2, pre_activation, expert_offsets, activation):
    pre_width, _ = check_expert_mlp("expert_mlp_backward", x, w1, w2, expert_offsets, activation)
    check_like_x("expert_mlp_backward", "grad_y", grad_y, x)
    check_like_x("expert_mlp_backward", "pre_activation", pre_activation, x)
    torch._check_value(
        grad_y.shape == x.shape,
        lambda: f"expert_mlp_backward: grad_y must have x's shape {list(x.shape)}, got {list(grad_y.shape)}",
    )
    torch._check_value(
        pre_activation.shape == (*x.shape[:-1], pre_width),
        lambda: (
            f"expert_mlp_backward: pre_activation must have shape {[*x.shape[:-1], pre_width]}, got "
            f"{list(pre_activation.shape)}"
        ),
    )
    E, D, _ = w1.shape
    # contiguous, as the kernels return them
    return (
        x.new_empty(x.shape),
        w1.new_empty(w1.shape),
        w1.new_empty((E, pre_width)),
        w2.new_empty(w2.shape),
        w2.new_empty((E, D)),
    )


# ---- autograd: saves x, w1, w2, the pre-activation and the offsets; the backward recomputes the activation ----


def _setup_context(ctx, inputs, output):
    x, w1, _, w2, _, expert_offsets, activation = inputs
    _, pre_activation = output
    ctx.mark_non_differentiable(pre_activation)
    ctx.save_for_backward(x, w1, w2, pre_activation, expert_offsets)
    ctx.activation = activation


def _expert_mlp_backward(ctx, grad_y, _grad_pre_activation):
    x, w1, w2, pre_activation, expert_offsets = ctx.saved_tensors
    grads = _ops.expert_mlp_backward(grad_y, x, w1, w2, pre_activation, expert_offsets, ctx.activation)
    return (*(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), None, None)


torch.library.register_autograd("visionmoe::expert_mlp", _expert_mlp_backward, setup_context=_setup_context)
