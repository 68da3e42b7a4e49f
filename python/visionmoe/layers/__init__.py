"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks, MoE blocks for CNNs."""

from .conv_moe import (GATINGS, HARD_CONSTRAINTS, ConstrainedTokenChoiceRouter, ConvMoE, ResidualBody, SlotBatchNorm2d,
                       residual_shortcut)
from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses
from .teacher_router import TeacherRouter, aligned_blocks, student_moe_layers, student_router_logits

__all__ = [
    "ACTIVATIONS",
    "ConstrainedTokenChoiceRouter",
    "ConvMoE",
    "ExpertMLPs",
    "GATINGS",
    "HARD_CONSTRAINTS",
    "MoEMLP",
    "ResidualBody",
    "SlotBatchNorm2d",
    "SoftMoEMLP",
    "TeacherRouter",
    "aligned_blocks",
    "aux_losses",
    "residual_shortcut",
    "student_moe_layers",
    "student_router_logits",
]
