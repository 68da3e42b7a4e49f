"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks, MoE blocks for CNNs, the
teacher router of TGR-MoE, the What-Where Transformer's block and Slot Attention (its object-discovery baseline);
and the dense ViT parts (patch embedding, attention, MLP) the models and the What-Where block are built from, as in
timm.layers."""

from .attention import Attention
from .conv_moe import (
    GATINGS,
    HARD_CONSTRAINTS,
    ConstrainedTokenChoiceRouter,
    ConvMoE,
    ResidualBody,
    SlotBatchNorm2d,
    residual_shortcut,
)
from .mlp import Mlp
from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses
from .patch_embed import PatchEmbed
from .slot_attention import SlotAttention
from .teacher_router import TeacherRouter, aligned_blocks, student_moe_layers, student_router_logits
from .whatwhere import SLOT_UPDATES, WHERE_RESIDUALS, WhatWhereBlock

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "ConstrainedTokenChoiceRouter",
    "ConvMoE",
    "ExpertMLPs",
    "GATINGS",
    "HARD_CONSTRAINTS",
    "Mlp",
    "MoEMLP",
    "PatchEmbed",
    "ResidualBody",
    "SLOT_UPDATES",
    "SlotAttention",
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
