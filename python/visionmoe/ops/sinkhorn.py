"""Log-domain Sinkhorn normalisation of router logits: a thin wrapper over ``torch.ops.visionmoe.sinkhorn``.

Shape letters: G groups (normalised independently), T tokens per group, E experts, K iterations. The fake
kernels and the autograd formula of the operator are registered here.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_same_device, check_sinkhorn, shape_of
from ..constants import DEFAULT_SINKHORN_ITERATIONS

_ops = torch.ops.visionmoe


def sinkhorn(
    logits: torch.Tensor, num_iterations: int = DEFAULT_SINKHORN_ITERATIONS, *, validate: bool = True
) -> torch.Tensor:
    """Balances router logits with Sinkhorn iterations in the log domain.

    Finds potentials u [G, T] and v [G, E] so that P = exp(logits + u + v) is a transport plan whose rows
    (tokens) sum to 1 and whose columns (experts) sum to T / E, each group on its own. Both start at zero; each
    iteration sets ``u_t = -logsumexp_e(logits_te + v_e)``, then ``v_e = log(T / E) -
    logsumexp_t(logits_te + u_t)``. After the last (column) step the columns sum to T / E exactly and the rows
    to 1 approximately; more iterations bring the rows closer.

    Args:
        logits: [G, T, E] or [T, E] (one group) router logits, floating point. float16 and bfloat16 logits are
            computed in float32 and the result rounded to their dtype.
        num_iterations: K >= 0 row-and-column rounds; 0 returns the logits unchanged (as a copy). The default,
            20, is the fixed iteration count of the Sinkhorn routers of Liu et al. (2024, arXiv 2401.15969).
        validate: check that the logits are finite. On CUDA this costs one device-to-host synchronisation;
            callers whose logits are finite by construction pass False, which skips the check (the result for
            non-finite logits is then unspecified).

    Returns:
        log P, with the shape and dtype of ``logits``. Gradients flow back to ``logits`` through every
        iteration; the backward recomputes each iteration's softmaxes from the logits and the saved potentials
        (K * (T + E) numbers per group) rather than storing K [T, E] tensors.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"sinkhorn: logits must have shape [T, E] or [G, T, E], got {shape_of(logits)}")
    if logits.dim() == 2:
        return _ops.sinkhorn(logits.unsqueeze(0), num_iterations, validate)[0].squeeze(0)
    return _ops.sinkhorn(logits, num_iterations, validate)[0]


# ---- fake kernels: output shapes and dtypes without running anything ----


def _potential_dtype(dtype: torch.dtype) -> torch.dtype:
    """The opmath type the kernels compute in and store the potentials in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("visionmoe::sinkhorn")
def _sinkhorn_fake(logits, num_iterations, validate=True):
    torch._check_value(
        logits.dim() == 3, lambda: f"sinkhorn: logits must have shape [G, T, E], got {list(logits.shape)}"
    )
    check_sinkhorn("sinkhorn", logits, num_iterations)
    groups, tokens, experts = logits.shape
    dtype = _potential_dtype(logits.dtype)
    return (
        torch.empty_like(logits, memory_format=torch.contiguous_format),
        logits.new_empty((groups, num_iterations, tokens), dtype=dtype),
        logits.new_empty((groups, num_iterations, experts), dtype=dtype),
    )


@torch.library.register_fake("visionmoe::sinkhorn_backward")
def _sinkhorn_backward_fake(grad_log_plan, logits, row_potentials, column_potentials):
    check_same_device(
        "sinkhorn_backward",
        "logits",
        logits,
        grad_log_plan=grad_log_plan,
        row_potentials=row_potentials,
        column_potentials=column_potentials,
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---- autograd: the backward pass is an operator too ----


def _setup_sinkhorn(ctx, inputs, output):
    logits, _, _ = inputs
    _, row_potentials, column_potentials = output
    ctx.mark_non_differentiable(row_potentials, column_potentials)
    ctx.save_for_backward(logits, row_potentials, column_potentials)


def _sinkhorn_backward(ctx, grad_log_plan, grad_row_potentials, grad_column_potentials):
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.sinkhorn_backward(grad_log_plan.contiguous(), *ctx.saved_tensors)
    return grad_logits, None, None


torch.library.register_autograd("visionmoe::sinkhorn", _sinkhorn_backward, setup_context=_setup_sinkhorn)
