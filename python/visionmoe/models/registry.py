"""The model registry: entrypoint functions registered by name, built with :func:`create_model`."""

from __future__ import annotations

from torch import nn

from ..registry import Registry

_MODELS = Registry("model")

#: Decorator adding a model entrypoint (keyword arguments -> nn.Module) under a name.
register_model = _MODELS.register


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as ``name`` (see :func:`list_models`); ``kwargs`` override its defaults."""
    return _MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return _MODELS.names()
