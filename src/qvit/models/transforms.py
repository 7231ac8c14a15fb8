"""Structural transforms: rewrites of a prepared model that a :class:`~qvit.QuantConfig` declares (``transforms``)
and :func:`~qvit.prepare` applies after swapping the modules, so that every way of building a quantized model (a
recipe, a bare config, a packed checkpoint) gives the same structure."""
from __future__ import annotations

from typing import Callable, List

import torch.nn as nn

from ..config import QuantConfig
from ..nn.qkr import enable_qkr
from ..registry import Registry

#: ``transform(model, config) -> new site names``: rewrites a prepared ``model`` in place; the quantizers of the
#: sites it adds take their specs from ``config`` (``config.spec_for``), uncalibrated.
Transform = Callable[[nn.Module, QuantConfig], List[str]]

TRANSFORMS: Registry[str, Transform] = Registry("transform")
register_transform = TRANSFORMS.register
TRANSFORMS.add("query_key_reparameterization", enable_qkr)


def list_transforms() -> List[str]:
    """Names of the registered transforms."""
    return TRANSFORMS.names()


def apply_transforms(model: nn.Module, config: QuantConfig) -> List[str]:
    """Apply ``config.transforms`` to the prepared ``model`` in order; returns the sites they added."""
    sites: List[str] = []
    for name in config.transforms:
        try:
            transform = TRANSFORMS.get(name)
        except KeyError as err:
            raise ValueError(f"QuantConfig transforms: {err.args[0]}") from None
        sites.extend(transform(model, config))
    return sites
