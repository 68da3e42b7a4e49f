"""TGR-MoE's routing-distillation loss: a thin wrapper over ``torch.ops.visionmoe.teacher_routing_loss``.

Shape letters: T tokens, E experts. The fake kernels and the autograd formula of the operator are registered
here.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the operators)
from ..checks import check_same_device, check_teacher_routing
from ..constants import REDUCTIONS, TEACHER_FORMATS

_ops = torch.ops.visionmoe


def teacher_routing_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str = "mean",
    teacher_format: str = "probabilities",
) -> torch.Tensor:
    """KL(p_teacher || softmax(student_logits)) per token, fused: the routing-distillation loss of TGR-MoE.

    Per token t, ``KL_t = sum_e p[t, e] * (log p[t, e] - log_softmax(student_logits[t])[e])``, with
    ``0 * log 0 = 0``. The teacher is a stop-gradient target, as in TGR-MoE: no gradient flows to ``teacher``
    even when it requires grad (train the teacher router with its own losses). The gradient with respect to
    the student's logits is ``g_t * (softmax(student_logits[t]) - p[t])``, with ``g_t`` the upstream gradient
    of ``KL_t`` (divided by T for the mean), for rows ``p[t]`` that sum to 1 (else the softmax term is scaled by
    the row's sum, the exact gradient of the formula above). The backward recomputes both softmaxes from the
    inputs and the per-token log-sum-exps saved by the forward (one or two [T] vectors), not from saved [T, E]
    tensors.

    Args:
        student_logits: [T, E] router logits of the student, floating point.
        teacher: [T, E] with the dtype and device of ``student_logits``: the teacher's routing probabilities
            (``teacher_format="probabilities"``: non-negative, each row summing to 1, zeros allowed; rows are used
            as given, not renormalised) or its logits (``teacher_format="logits"``), which are softmaxed over E.
        reduction: ``"none"`` (the [T] per-token losses), ``"mean"`` (their mean; 0 for T = 0) or ``"sum"``.
        teacher_format: ``"probabilities"`` or ``"logits"``.

    Returns:
        [T] for ``reduction="none"``, else a scalar. float16 and bfloat16 inputs are computed in float32 and the
        loss is float32; float32 and float64 inputs give a loss of their own dtype.

    Raises:
        TypeError: for inputs that are not floating point or not of one dtype.
        ValueError: for inputs that are not [T, E] tensors of one shape and device, for E = 0, for an unknown
            ``reduction`` or ``teacher_format``, and for non-finite logits or teacher probabilities that are
            negative or not finite, naming the first offending entry, on CPU and CUDA alike (on CUDA the check
            costs one device-to-host synchronisation per forward).
    """
    loss, _, _ = _ops.teacher_routing_loss(student_logits, teacher, reduction, teacher_format)
    return loss


# ---- fake kernels: output shapes and dtypes without running anything ----


def _check_options(op: str, reduction: str, teacher_format: str) -> None:
    torch._check_value(
        reduction in REDUCTIONS, lambda: f'{op}: reduction must be "none", "mean" or "sum", got "{reduction}"'
    )
    torch._check_value(
        teacher_format in TEACHER_FORMATS,
        lambda: f'{op}: teacher_format must be "probabilities" or "logits", got "{teacher_format}"',
    )


@torch.library.register_fake("visionmoe::teacher_routing_loss")
def _teacher_routing_loss_fake(student_logits, teacher, reduction, teacher_format):
    check_teacher_routing("teacher_routing_loss", student_logits, teacher, reduction, teacher_format)
    tokens = student_logits.shape[0]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # the kernels' opmath type
    loss = student_logits.new_empty((tokens,) if reduction == "none" else (), dtype=dtype)
    student_lse = student_logits.new_empty((tokens,), dtype=dtype)
    teacher_lse = student_logits.new_empty((tokens if teacher_format == "logits" else 0,), dtype=dtype)
    return loss, student_lse, teacher_lse


@torch.library.register_fake("visionmoe::teacher_routing_loss_backward")
def _teacher_routing_loss_backward_fake(
    grad_loss, student_logits, teacher, student_lse, teacher_lse, reduction, teacher_format
):
    op = "teacher_routing_loss_backward"
    check_same_device(
        op,
        "student_logits",
        student_logits,
        grad_loss=grad_loss,
        teacher=teacher,
        student_lse=student_lse,
        teacher_lse=teacher_lse,
    )
    _check_options(op, reduction, teacher_format)
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


# ---- autograd: the backward pass is an operator too; the teacher gets no gradient ----


def _setup_teacher_routing_loss(ctx, inputs, output):
    student_logits, teacher, reduction, teacher_format = inputs
    _, student_lse, teacher_lse = output
    ctx.mark_non_differentiable(student_lse, teacher_lse)
    ctx.save_for_backward(student_logits, teacher, student_lse, teacher_lse)
    ctx.reduction = reduction
    ctx.teacher_format = teacher_format


def _teacher_routing_loss_backward(ctx, grad_loss, grad_student_lse, grad_teacher_lse):
    grad_student_logits = None
    if ctx.needs_input_grad[0]:
        student_logits, teacher, student_lse, teacher_lse = ctx.saved_tensors
        grad_student_logits = _ops.teacher_routing_loss_backward(
            grad_loss.contiguous(), student_logits, teacher, student_lse, teacher_lse, ctx.reduction, ctx.teacher_format
        )
    return grad_student_logits, None, None, None


torch.library.register_autograd(
    "visionmoe::teacher_routing_loss", _teacher_routing_loss_backward, setup_context=_setup_teacher_routing_loss
)
