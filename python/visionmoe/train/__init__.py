"""Training: :class:`Trainer` (AdamW, warm-up + cosine, mixed precision, router auxiliary losses, CSV/TensorBoard
logs, exactly resumable safetensors checkpoints) configured by :class:`TrainConfig`; the ``visionmoe-train``
command line is :func:`visionmoe.train.cli.main`."""

from .checkpoint import load_model, load_model_weights
from .config import TrainConfig, apply_overrides, config_from_dict, load_config, save_config, validate
from .routing_consistency import RoutingConsistencyTracker, RoutingSnapshot
from .schedule import warmup_cosine
from .trainer import FitResult, Trainer, build_datasets, expert_load_ratio, seed_everything

__all__ = [
    "FitResult",
    "RoutingConsistencyTracker",
    "RoutingSnapshot",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "build_datasets",
    "config_from_dict",
    "expert_load_ratio",
    "load_config",
    "load_model",
    "load_model_weights",
    "save_config",
    "seed_everything",
    "validate",
    "warmup_cosine",
]
