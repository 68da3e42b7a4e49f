"""The routing distillation loss of TGR-MoE (PAPERS.md section 4).

Shape letters: B images, N tokens per image, G groups, T tokens per group, E experts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import ops


def routing_distillation_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """(1 / |S|) * sum over the MoE layers S of the mean over tokens of KL(stopgrad(p_t) || softmax(student)).

    The training loss adds ``tgr_weight`` times this (the paper's 5.0 / |S| * sum of KLs). Each layer's
    student logits and teacher probabilities are paired token for token in row-major order: the student's
    [G, T, E] groups of whole images and the teacher's [B, N, E] hold the same G * T = B * N tokens.

    Args:
        student_logits: per MoE layer, [G, T, E] (or [T, E]) router logits of the student.
        teacher_probs: per MoE layer, [B, N, E] (or [T, E]) routing probabilities of the teacher router.

    Returns:
        scalar; gradients reach every expert's student logit and nothing of the teacher.
    """
    if len(student_logits) != len(teacher_probs) or not student_logits:
        raise ValueError(
            f"student_logits and teacher_probs must hold one tensor per MoE layer (at least one), got "
            f"{len(student_logits)} and {len(teacher_probs)}"
        )
    per_layer = []
    for index, (student, teacher) in enumerate(zip(student_logits, teacher_probs)):
        if student.numel() != teacher.numel() or student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"MoE layer {index}: the student routes {tuple(student.shape)} tokens x experts but the "
                f"teacher gives {tuple(teacher.shape)}; teacher and student must see the same tokens "
                "(image and patch size, class token) and the same number of experts"
            )
        num_experts = student.shape[-1]
        # In float32 whatever autocast made of the logits: the operator wants one dtype, and these [T, E] tensors
        # are too small for the precision to cost anything.
        per_layer.append(
            ops.teacher_routing_loss(
                student.reshape(-1, num_experts).float(), teacher.reshape(-1, num_experts).float(), reduction="mean"
            )
        )
    return torch.stack(per_layer).mean()
