"""QuantLinear: ``nn.Linear`` with quantized input and weight."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Linear as TimmLinear

from ..backend import get_backend
from ._registry import register_quant_module
from .base import QuantModule


@register_quant_module(TimmLinear)
@register_quant_module(nn.Linear, subclasses=True)
class QuantLinear(QuantModule, nn.Linear):
    """``y = x̂ Ŵᵀ + b`` with ``x̂ = input_quantizer(x)`` and ``Ŵ = weight_quantizer(W)``; bias in float."""

    quant_slots = (("input", False), ("weight", True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = get_backend().linear(self, x)      # a faster equal computation in training, where there is one
        if out is not None:
            return out
        x = self._quant("input", x)
        w = self._quant("weight", self.weight)
        return F.linear(x, w, self.bias)
