"""The model registry: entrypoint functions registered by name, built with :func:`create_model`."""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Function decorator adding a model entrypoint (keyword arguments -> nn.Module) under ``name``."""

    def add(entrypoint):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = entrypoint
        return entrypoint

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as ``name`` (see :func:`list_models`); ``kwargs`` override its defaults."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)
