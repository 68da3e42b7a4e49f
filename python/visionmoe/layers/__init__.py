"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks, MoE blocks for CNNs."""

from .conv_moe import (GATINGS, HARD_CONSTRAINTS, ConstrainedTokenChoiceRouter, ConvMoE, ResidualBody, SlotBatchNorm2d,
                       residual_shortcut)
from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses

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
    "aux_losses",
    "residual_shortcut",
]
