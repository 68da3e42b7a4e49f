"""Name registries: routers and models are created by name from registered constructors."""

from __future__ import annotations

from typing import Callable, Dict


class Registry:
    """Maps names to constructors of one kind of object (e.g. "router", "model")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._constructors: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable:
        """Decorator adding a class or function under ``name``; a name can be registered once."""

        def add(constructor):
            if name in self._constructors:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._constructors[name] = constructor
            return constructor

        return add

    def create(self, name: str, *args, **kwargs):
        """Calls the constructor registered as ``name``."""
        if name not in self._constructors:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._constructors[name](*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._constructors)
