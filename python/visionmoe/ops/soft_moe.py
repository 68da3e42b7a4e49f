"""Soft MoE dispatch and combine (Puigcerver et al. 2023): thin wrappers over ``torch.ops.visionmoe``.

Shape letters: G groups (routed independently, e.g. images), T tokens per group, S slots (E experts times P
slots per expert), D width. Both operators take the router's logits [G, T, S] and apply their softmax
themselves: dispatch normalises each slot's column over the tokens, combine each token's row over the slots.
Autograd saves only the inputs; the backward operators recompute the softmax rather than store a [G, T, S]
weight tensor per call, and return gradients for the features and for the logits. float16 and bfloat16
softmaxes are computed in float32. Double backward is not supported.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_dtype_like, check_same_device, check_soft_inputs

_ops = torch.ops.visionmoe


def soft_dispatch(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mixes each group's tokens into its slots: ``slots[g, s] = sum_t softmax_t(logits[g, :, s])[t] * x[g, t]``.

    Args:
        x: [G, T, D] token features (float32, float64, float16 or bfloat16).
        logits: [G, T, S] router logits, x's dtype and device. T must be >= 1 when G and S are.

    Returns:
        [G, S, D] slot inputs: each is a convex combination of its group's tokens.
    """
    return _ops.soft_dispatch(x, logits)


def soft_combine(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mixes slot outputs back into tokens: ``out[g, t] = sum_s softmax_s(logits[g, t, :])[s] * y[g, s]``.

    Args:
        y: [G, S, D] slot outputs (the experts' outputs on the dispatched slots).
        logits: [G, T, S] router logits, y's dtype and device (the same logits as the dispatch's).
            S must be >= 1 when G and T are.

    Returns:
        [G, T, D]: each token's output is a convex combination of its group's slot outputs.
    """
    return _ops.soft_combine(y, logits)


# ---- fake kernels: output shapes and dtypes without running anything ----


def _check_fake_grad(op: str, name: str, grad: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    torch._check_value(
        grad.shape == shape, lambda: f"{op}: {name} must have shape {list(shape)}, got {list(grad.shape)}"
    )
    check_dtype_like(op, name, grad, "the inputs", like)
    check_same_device(op, "the inputs", like, **{name: grad})


@torch.library.register_fake("visionmoe::soft_dispatch")
def _soft_dispatch_fake(x, logits):
    check_soft_inputs("soft_dispatch", x, "x", logits)
    return x.new_empty((x.shape[0], logits.shape[2], x.shape[2]))


@torch.library.register_fake("visionmoe::soft_dispatch_backward")
def _soft_dispatch_backward_fake(grad_slots, x, logits):
    check_soft_inputs("soft_dispatch_backward", x, "x", logits)
    _check_fake_grad("soft_dispatch_backward", "grad_slots", grad_slots, (x.shape[0], logits.shape[2], x.shape[2]), x)
    return x.new_empty(x.shape), logits.new_empty(logits.shape)  # contiguous, as the kernel returns them


@torch.library.register_fake("visionmoe::soft_combine")
def _soft_combine_fake(y, logits):
    check_soft_inputs("soft_combine", y, "y", logits)
    return y.new_empty((y.shape[0], logits.shape[1], y.shape[2]))


@torch.library.register_fake("visionmoe::soft_combine_backward")
def _soft_combine_backward_fake(grad_out, y, logits):
    check_soft_inputs("soft_combine_backward", y, "y", logits)
    _check_fake_grad("soft_combine_backward", "grad_out", grad_out, (y.shape[0], logits.shape[1], y.shape[2]), y)
    return y.new_empty(y.shape), logits.new_empty(logits.shape)  # contiguous, as the kernel returns them


# ---- autograd: only the inputs are saved; the backward operators recompute the softmax ----


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _soft_dispatch_backward(ctx, grad_slots):
    x, logits = ctx.saved_tensors
    grad_x, grad_logits = _ops.soft_dispatch_backward(grad_slots, x, logits)
    return (grad_x if ctx.needs_input_grad[0] else None), (grad_logits if ctx.needs_input_grad[1] else None)


def _soft_combine_backward(ctx, grad_out):
    y, logits = ctx.saved_tensors
    grad_y, grad_logits = _ops.soft_combine_backward(grad_out, y, logits)
    return (grad_y if ctx.needs_input_grad[0] else None), (grad_logits if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("visionmoe::soft_dispatch", _soft_dispatch_backward, setup_context=_save_inputs)
torch.library.register_autograd("visionmoe::soft_combine", _soft_combine_backward, setup_context=_save_inputs)
