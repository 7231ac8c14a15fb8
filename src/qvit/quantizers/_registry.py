"""Name -> quantizer class registry (``@register_quantizer("uniform")``)."""
from __future__ import annotations

from typing import Callable, List, Type, TypeVar

from ..registry import Registry

QUANTIZERS: Registry[str, type] = Registry("quantizer kind")
T = TypeVar("T", bound=type)


def register_quantizer(name: str) -> Callable[[T], T]:
    """Class decorator: make a quantizer family constructible by ``name`` (its ``kind``)."""

    def wrap(cls: T) -> T:
        QUANTIZERS.add(name, cls)
        cls.kind = name
        return cls

    return wrap


def get_quantizer_class(name: str) -> Type:
    """The class registered as ``name``; a ``KeyError`` naming the known kinds otherwise."""
    return QUANTIZERS.get(name)


def list_quantizers() -> List[str]:
    """Registered quantizer kinds, sorted."""
    return QUANTIZERS.names()
