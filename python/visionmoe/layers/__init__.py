"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks, MoE blocks for CNNs, the
teacher router of TGR-MoE and the What-Where Transformer's block."""

from .conv_moe import (GATINGS, HARD_CONSTRAINTS, ConstrainedTokenChoiceRouter, ConvMoE, ResidualBody, SlotBatchNorm2d,
                       residual_shortcut)
from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses
from .teacher_router import TeacherRouter, aligned_blocks, student_moe_layers, student_router_logits
from .whatwhere import SLOT_UPDATES, WHERE_RESIDUALS, WhatWhereBlock

__all__ = [
    "ACTIVATIONS",
    "ConstrainedTokenChoiceRouter",
    "ConvMoE",
    "ExpertMLPs",
    "GATINGS",
    "HARD_CONSTRAINTS",
    "MoEMLP",
    "ResidualBody",
    "SLOT_UPDATES",
    "SlotBatchNorm2d",
    "SoftMoEMLP",
    "TeacherRouter",
    "WHERE_RESIDUALS",
    "WhatWhereBlock",
    "aligned_blocks",
    "aux_losses",
    "residual_shortcut",
    "student_moe_layers",
    "student_router_logits",
]
