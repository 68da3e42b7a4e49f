"""What-where attention (What-Where Transformer, arXiv 2605.12021): a thin wrapper over ``torch.ops.visionmoe``.

Shape letters: B batch, H heads, N tokens, S slots, dh query/key width per head, dv value width per head. Tokens
and slots share one logit map per head, ``logits = where + q k^T / sqrt(dh)`` [B, H, N, S]; tokens read the slots
through its softmax over tokens, slots read the tokens through its softmax over slots. One operator computes
the logits, both softmaxes and both aggregations per head while the [N, S] tile is in cache; autograd saves the
inputs, the logits (an output) and two log-sum-exps (B * H * (N + S) numbers), and the backward operator
recomputes both softmaxes from them instead of keeping two [B, H, N, S] probability tensors alive. Gradients flow
to every input from every output. Double backward is not supported.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_same_device, check_whatwhere, check_whatwhere_operand

_ops = torch.ops.visionmoe


def whatwhere_attention(
    q: torch.Tensor, k: torch.Tensor, v_tokens: torch.Tensor, v_slots: torch.Tensor, where: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared-logit attention between tokens and slots, normalised along both axes.

    With ``L = where + q k^T / sqrt(dh)`` per (b, h):
    ``token_update[n] = sum_s softmax_over_N(L)[n, s] * v_slots[s]`` (softmax along dim -2 of L, so each slot's
    weights over the tokens sum to 1) and ``slot_update[s] = sum_n softmax_over_S(L)[n, s] * v_tokens[n]``
    (softmax along dim -1, so each token's weights over the slots sum to 1).

    Args:
        q: [B, H, N, dh] token queries (float32, float64, float16 or bfloat16; dh >= 1).
        k: [B, H, S, dh] slot keys.
        v_tokens: [B, H, N, dv] token values, read by the slots.
        v_slots: [B, H, S, dv] slot values, read by the tokens.
        where: [B, H, N, S] additive where-maps (e.g. the WWT's where-state; zeros for plain attention).
        All five share q's dtype and device; any memory layout is accepted (non-contiguous inputs are copied).
        float16 and bfloat16 inputs are computed with float32 accumulation; their logits are rounded to the
        input dtype before the softmaxes. N = 0 or S = 0 give all-zero updates.

    Returns:
        (token_update [B, H, N, dv], slot_update [B, H, S, dv], logits [B, H, N, S]), contiguous, in q's dtype;
        all three are differentiable.
    """
    token_update, slot_update, logits, _, _ = _ops.whatwhere_attention(q, k, v_tokens, v_slots, where)
    return token_update, slot_update, logits


# ---- fake kernels: output shapes and dtypes without running anything ----


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in and store the log-sum-exps in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("visionmoe::whatwhere_attention")
def _whatwhere_attention_fake(q, k, v_tokens, v_slots, where):
    B, H, N, S, dh, dv = check_whatwhere("whatwhere_attention", q, k, v_tokens, v_slots)
    check_whatwhere_operand("whatwhere_attention", "where", "[B, H, N, S]", where, (B, H, N, S), q)
    opmath = _opmath_dtype(q.dtype)
    return (
        q.new_empty((B, H, N, dv)),
        q.new_empty((B, H, S, dv)),
        q.new_empty((B, H, N, S)),
        q.new_empty((B, H, N), dtype=opmath),
        q.new_empty((B, H, S), dtype=opmath),
    )


@torch.library.register_fake("visionmoe::whatwhere_attention_backward")
def _whatwhere_attention_backward_fake(
    grad_token_update, grad_slot_update, grad_logits, q, k, v_tokens, v_slots, logits, token_logsumexp, slot_logsumexp
):
    op = "whatwhere_attention_backward"
    B, H, N, S, dh, dv = check_whatwhere(op, q, k, v_tokens, v_slots)
    check_whatwhere_operand(op, "logits", "[B, H, N, S]", logits, (B, H, N, S), q)
    for name, grad, letters, shape in (
        ("grad_token_update", grad_token_update, "[B, H, N, dv]", (B, H, N, dv)),
        ("grad_slot_update", grad_slot_update, "[B, H, S, dv]", (B, H, S, dv)),
        ("grad_logits", grad_logits, "[B, H, N, S]", (B, H, N, S)),
    ):
        if grad is not None:
            check_whatwhere_operand(op, name, letters, grad, shape, q)
    opmath = _opmath_dtype(q.dtype)
    for name, stats, letters, shape in (
        ("token_logsumexp", token_logsumexp, "[B, H, N]", (B, H, N)),
        ("slot_logsumexp", slot_logsumexp, "[B, H, S]", (B, H, S)),
    ):
        torch._check_value(
            tuple(stats.shape) == shape,
            lambda: f"{op}: {name} must have shape {letters} = {list(shape)}, got {list(stats.shape)}",
        )
        torch._check_type(stats.dtype == opmath, lambda: f"{op}: {name} must have dtype {opmath}, got {stats.dtype}")
        check_same_device(op, "q", q, **{name: stats})
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v_tokens.new_empty(v_tokens.shape),
        v_slots.new_empty(v_slots.shape),
        logits.new_empty(logits.shape),
    )


# ---- autograd: inputs, logits and log-sum-exps are saved; the backward operator recomputes both softmaxes ----


def _setup_whatwhere_attention(ctx, inputs, output):
    q, k, v_tokens, v_slots, _ = inputs
    _, _, logits, token_logsumexp, slot_logsumexp = output
    ctx.mark_non_differentiable(token_logsumexp, slot_logsumexp)
    # An output nothing depends on brings no gradient (None, not a tensor of zeros): its terms are skipped.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v_tokens, v_slots, logits, token_logsumexp, slot_logsumexp)


def _whatwhere_attention_backward(ctx, grad_token_update, grad_slot_update, grad_logits, _token_lse, _slot_lse):
    grads = _ops.whatwhere_attention_backward(grad_token_update, grad_slot_update, grad_logits, *ctx.saved_tensors)
    return tuple(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad))


torch.library.register_autograd(
    "visionmoe::whatwhere_attention", _whatwhere_attention_backward, setup_context=_setup_whatwhere_attention
)
