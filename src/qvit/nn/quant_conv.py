"""QuantConv2d: ``nn.Conv2d`` with quantized input and weight."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_quant_module
from .base import QuantModule


@register_quant_module(nn.Conv2d, subclasses=True)
class QuantConv2d(QuantModule, nn.Conv2d):
    """Convolution of ``input_quantizer(x)`` with ``weight_quantizer(W)``; bias in float."""

    quant_slots = (("input", False), ("weight", True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant("input", x)
        w = self._quant("weight", self.weight)
        return self._conv_forward(x, w, self.bias)
