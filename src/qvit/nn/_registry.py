"""Float module class -> quantized module class registry."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn

_QUANT_MODULES: Dict[type, Tuple[type, bool]] = {}


def register_quant_module(float_cls: type, *, subclasses: bool = False) -> Callable[[type], type]:
    """Class decorator: the decorated quantized class replaces ``float_cls`` in ``qvit.prepare``.

    With ``subclasses=True`` it also replaces subclasses of ``float_cls`` that are not registered
    themselves and do not override ``forward`` (a subclass with its own maths is left alone).
    """

    def wrap(quant_cls: type) -> type:
        if float_cls in _QUANT_MODULES and _QUANT_MODULES[float_cls][0] is not quant_cls:
            raise ValueError(f"{float_cls.__qualname__} already maps to {_QUANT_MODULES[float_cls][0].__qualname__}")
        _QUANT_MODULES[float_cls] = (quant_cls, subclasses)
        return quant_cls

    return wrap


def quant_class_for(module: nn.Module) -> Optional[type]:
    """The quantized class registered for ``module``'s class (exact match first, then allowed bases)."""
    cls = type(module)
    if cls in _QUANT_MODULES:
        return _QUANT_MODULES[cls][0]
    for base in cls.__mro__[1:]:
        entry = _QUANT_MODULES.get(base)
        if entry is not None and entry[1] and cls.forward is base.forward:
            return entry[0]
    return None


def registered_float_classes() -> Tuple[type, ...]:
    return tuple(_QUANT_MODULES)
