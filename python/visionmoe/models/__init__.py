"""Models built from visionmoe's layers, created by name: ``create_model(name, **kwargs)``, ``list_models()``."""

from . import resnet_moe
from .registry import create_model, list_models, register_model
from .resnet_moe import ResNetMoE

__all__ = ["ResNetMoE", "create_model", "list_models", "register_model", "resnet_moe"]
