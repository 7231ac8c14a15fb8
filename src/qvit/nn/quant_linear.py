"""QuantLinear: ``nn.Linear`` with quantized input and weight."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Linear as TimmLinear

from ._registry import register_quant_module
from .base import QuantModule
from .recompute import can_recompute, quant_linear


@register_quant_module(TimmLinear)
@register_quant_module(nn.Linear, subclasses=True)
class QuantLinear(QuantModule, nn.Linear):
    """``y = x̂ Ŵᵀ + b`` with ``x̂ = input_quantizer(x)`` and ``Ŵ = weight_quantizer(W)``; bias in float."""

    quant_slots = (("input", False), ("weight", True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_recompute(self, (self.input_quantizer, self.weight_quantizer)):
            return quant_linear(self, x)    # keeps x, not x̂ and Ŵ, for the backward pass
        x = self._quant("input", x)
        w = self._quant("weight", self.weight)
        return F.linear(x, w, self.bias)
