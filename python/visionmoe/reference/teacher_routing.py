"""Routing distillation (TGR-MoE, PAPERS.md section 4): KL(stopgrad(p_teacher) || softmax(student_logits)).

Shape letters: T tokens, E experts.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
TEACHER_FORMATS = ("probabilities", "logits")


def teacher_routing_loss(student_logits: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean",
                         teacher_format: str = "probabilities") -> torch.Tensor:
    """KL(p_t || p_s) = sum_e p_t[e] (log p_t[e] - log p_s[e]) per token, p_s = softmax(student_logits).

    No gradient reaches ``teacher`` (it is detached); the gradient in the student's logits is p_s - p_t, so it
    reaches every expert's logit, selected or not. Terms with p_t[e] = 0 contribute 0.

    Args:
        student_logits: [T, E] floating-point router logits of the student.
        teacher: [T, E] the teacher's routing probabilities (rows summing to 1) or, with
            ``teacher_format="logits"``, its logits.
        reduction: "mean" (over tokens), "sum" or "none" ([T] per token).
        teacher_format: "probabilities" or "logits".

    Returns:
        a scalar, or [T] for ``reduction="none"``; in the student's dtype, computed in at least float32.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if teacher_format not in TEACHER_FORMATS:
        raise ValueError(f"teacher_format must be one of {TEACHER_FORMATS}, got {teacher_format!r}")
    for name, value in (("student_logits", student_logits), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
            raise ValueError(f"{name} must be a floating-point [T, E] tensor, got "
                             f"{getattr(value, 'dtype', type(value).__name__)} of shape "
                             f"{tuple(getattr(value, 'shape', ()))}")
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher must have the shape of student_logits {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher.shape)}")
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_log_probs = student_logits.to(compute_dtype).log_softmax(dim=-1)
    teacher = teacher.detach().to(compute_dtype)
    if teacher_format == "logits":
        teacher_log_probs = teacher.log_softmax(dim=-1)
        teacher_probs = teacher_log_probs.exp()
        per_token = (teacher_probs * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    else:
        # xlogy gives 0 * log 0 = 0 for experts the teacher never picks.
        per_token = (torch.xlogy(teacher, teacher) - teacher * student_log_probs).sum(dim=-1)
    if reduction == "mean":
        per_token = per_token.mean()
    elif reduction == "sum":
        per_token = per_token.sum()
    return per_token.to(student_logits.dtype)
