"""Layers built from visionmoe's routers and operators: MoE MLPs for transformer blocks."""

from .moe_mlp import ACTIVATIONS, ExpertMLPs, MoEMLP, SoftMoEMLP, aux_losses

__all__ = ["ACTIVATIONS", "ExpertMLPs", "MoEMLP", "SoftMoEMLP", "aux_losses"]
