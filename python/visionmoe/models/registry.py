"""The model registry: ``create_model(name, **kwargs)`` builds a registered model, ``list_models()`` names them."""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator adding a model entrypoint (a function returning an nn.Module) under ``name``."""

    def add(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as ``name`` with ``kwargs`` (see :func:`list_models`)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)
