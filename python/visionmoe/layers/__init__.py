"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks, MoE blocks for CNNs."""

from .conv_moe import (GATINGS, HARD_CONSTRAINTS, ConstrainedTokenChoiceRouter, ConvMoE, ResidualBody, SlotBatchNorm2d,
                       residual_shortcut)
from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses
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
    "WHERE_RESIDUALS",
    "WhatWhereBlock",
    "aux_losses",
    "residual_shortcut",
]
