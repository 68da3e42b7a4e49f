"""Models by name: ``create_model(name, **kwargs)`` builds one, ``list_models()`` lists the names.

Vision Transformers (dense ViT, V-MoE, Soft-MoE ViT) and What-Where Transformers (``wwt_*``) at 224 px and, as
``*_32``, for 32 px images; ResNets with MoE blocks; ``slot_attention_32``, the slot-attention baseline of WWT's
object discovery; ``upcycle`` turns a dense ViT into an MoE one with experts
initialised from its MLPs.
"""

from .registry import create_model, list_models, register_model
from .resnet_moe import ResNetMoE  # importing a model module registers its entrypoints
from .slot_attention import SlotAttentionClassifier  # noqa: E402 (after whatwhere, whose head it reuses)
from .vit import (
    MOE_LAYERS,
    SOFT_MOE_OPTIONS,
    VMOE_OPTIONS,
    VisionTransformer,
    default_moe_blocks,
    default_moe_options,
    upcycle,
)
from .whatwhere import READOUTS, WWT_VARIANTS, ObjectDiscovery, WhatWhereTransformer, WhatWhereVariant

__all__ = [
    "MOE_LAYERS",
    "ObjectDiscovery",
    "READOUTS",
    "ResNetMoE",
    "SOFT_MOE_OPTIONS",
    "SlotAttentionClassifier",
    "VMOE_OPTIONS",
    "VisionTransformer",
    "WWT_VARIANTS",
    "WhatWhereTransformer",
    "WhatWhereVariant",
    "create_model",
    "default_moe_blocks",
    "default_moe_options",
    "list_models",
    "register_model",
    "upcycle",
]
