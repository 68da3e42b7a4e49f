"""Pure-PyTorch reference of TGR-MoE's routing-distillation loss: the readable spec and the test oracle.

Same signature as :func:`visionmoe.ops.teacher_routing_loss`: ``log_softmax`` of the student's logits and
``kl_div`` against the (detached) teacher distribution. Autograd keeps the [T, E] log-softmax and the teacher
for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_teacher_routing, check_teacher_routing_values


def teacher_routing_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str = "mean",
    teacher_format: str = "probabilities",
) -> torch.Tensor:
    """Reference of :func:`visionmoe.ops.teacher_routing_loss`: per token
    ``KL(p_teacher || softmax(student_logits))`` over E, for [T, E] inputs, reduced by ``reduction``.

    The teacher is detached (a stop-gradient target). float16 and bfloat16 inputs are computed in float32, as
    the operator does; the mean of zero tokens is 0.
    """
    check_teacher_routing("teacher_routing_loss", student_logits, teacher, reduction, teacher_format)
    check_teacher_routing_values("teacher_routing_loss", student_logits, teacher.detach(), teacher_format)
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_student = F.log_softmax(student_logits.to(compute_dtype), dim=-1)
    target = teacher.detach().to(compute_dtype)
    if teacher_format == "logits":
        per_token = F.kl_div(log_student, F.log_softmax(target, dim=-1), reduction="none", log_target=True).sum(-1)
    else:
        # kl_div computes target * (log target - input) with xlogy, so zero probabilities add exactly 0.
        per_token = F.kl_div(log_student, target, reduction="none").sum(-1)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / max(student_logits.shape[0], 1)
