"""Name -> quantizer class registry (``@register_quantizer("uniform")``)."""
from __future__ import annotations

from typing import Callable, Dict, List, Type, TypeVar

_QUANTIZERS: Dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_quantizer(name: str) -> Callable[[T], T]:
    """Class decorator: make a quantizer family constructible by ``name``."""

    def wrap(cls: T) -> T:
        if name in _QUANTIZERS and _QUANTIZERS[name] is not cls:
            raise ValueError(f"quantizer kind {name!r} is already registered by {_QUANTIZERS[name].__qualname__}")
        cls.kind = name
        _QUANTIZERS[name] = cls
        return cls

    return wrap


def get_quantizer_class(name: str) -> Type:
    """The class registered as ``name``; a ``KeyError`` naming the known kinds otherwise."""
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise KeyError(f"unknown quantizer kind {name!r}; known kinds: {', '.join(list_quantizers())}") from None


def list_quantizers() -> List[str]:
    """Registered quantizer kinds, sorted."""
    return sorted(_QUANTIZERS)
