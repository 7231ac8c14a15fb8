"""QuantMlp: timm's ``Mlp``, which a kernel backend may run with the activation inside the second layer's kernels."""
from __future__ import annotations

import torch
from timm.layers import Mlp

from ..backend import get_backend
from ._registry import register_quant_module
from .base import QuantModule


@register_quant_module(Mlp)
class QuantMlp(QuantModule, Mlp):
    """``fc2(act(fc1(x)))`` exactly as timm computes it. The module has no quantizers of its own (``fc1`` and ``fc2``
    are ``QuantLinear``); it exists so that a backend may compute the same in fewer passes (see
    :func:`qvit.kernels.mlp_prologue`)."""

    quant_slots = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = get_backend().mlp(self, x)
        return Mlp.forward(self, x) if out is None else out
