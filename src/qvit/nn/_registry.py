"""Float module class -> quantized module class registry."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch.nn as nn

from ..registry import Registry


class _Entry(NamedTuple):
    quant_cls: type
    subclasses: bool


QUANT_MODULES: Registry[type, _Entry] = Registry("quantized version of")


def register_quant_module(float_cls: type, *, subclasses: bool = False) -> Callable[[type], type]:
    """Class decorator: the decorated quantized class replaces ``float_cls`` in ``qvit.prepare``.

    With ``subclasses=True`` it also replaces subclasses of ``float_cls`` that are not registered
    themselves and do not override ``forward`` (a subclass with its own maths is left alone).
    """

    def wrap(quant_cls: type) -> type:
        QUANT_MODULES.add(float_cls, _Entry(quant_cls, subclasses))
        return quant_cls

    return wrap


def quant_class_for(module: nn.Module) -> Optional[type]:
    """The quantized class registered for ``module``'s class (exact match first, then allowed bases)."""
    cls = type(module)
    if cls in QUANT_MODULES:
        return QUANT_MODULES.get(cls).quant_cls
    for base in cls.__mro__[1:]:
        if base in QUANT_MODULES:
            entry = QUANT_MODULES.get(base)
            if entry.subclasses and cls.forward is base.forward:
                return entry.quant_cls
    return None


def registered_float_classes() -> Tuple[type, ...]:
    """The float classes that have a quantized version."""
    return tuple(QUANT_MODULES.keys())
