"""Teacher-guided routing (TGR-MoE, PAPERS.md section 4) in :class:`~visionmoe.train.Trainer`: building the teacher
router on a frozen dense teacher, the two loss terms it adds to a step, and its pre-training variant.

Shape letters: B images, N tokens per image, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import TeacherRouter, student_moe_layers, student_router_logits
from ..losses import routing_distillation_loss
from .checkpoint import load_model


def build_teacher_router(
    teacher_dir: str | Path, student: nn.Module, student_name: str, device: torch.device
) -> TeacherRouter:
    """A teacher router on the dense model saved in ``teacher_dir``, one router per MoE layer of ``student``."""
    if not student_moe_layers(student):
        raise ValueError(
            f"config key 'teacher' needs a student with sparse MoE layers to guide; model {student_name!r} has none"
        )
    teacher = load_model(teacher_dir, map_location=str(device))
    return TeacherRouter.from_student(teacher, student).to(device)


def teacher_guided_routing_losses(
    teacher_router: Optional[TeacherRouter], student: nn.Module, images: torch.Tensor, active: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(mean over MoE layers of KL(p_teacher || p_student), the teacher router's weighted losses) of the
    student's last forward, or None for each that is off: both without a teacher router or when not ``active``
    (``tgr_schedule`` has ended); the router's losses also when it is frozen."""
    if teacher_router is None or not active:
        return None, None
    teacher_probs = teacher_router(images)
    distillation_loss = routing_distillation_loss(student_router_logits(student), teacher_probs)
    if not teacher_router.trainable:
        return distillation_loss, None
    return distillation_loss, sum(teacher_router.losses(teacher_probs).values()).float()


def pretrain_teacher_router(
    teacher_router: TeacherRouter, image_batches: Iterable[torch.Tensor], lr: float, epochs: int, progress: tqdm
) -> None:
    """The pre-train variant: the teacher router alone, on its own losses, over ``image_batches`` (``epochs``
    epochs of [B, C, H, W] training images), then frozen."""
    teacher_router.train()
    history = teacher_router.pretrain(image_batches, lr=lr)
    progress.write(
        f"teacher router pre-trained for {epochs} epoch(s): loss {history[0]:.4f} -> {history[-1]:.4f}; frozen"
    )
