"""QuantMlp: timm's ``Mlp`` whose activation runs inside the second layer's quantizer kernels in training."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ._registry import register_quant_module
from .base import QuantModule
from .quant_linear import QuantLinear
from .recompute import can_recompute, quant_linear


def _prologue_name(act: nn.Module) -> Optional[str]:
    """The :data:`~qvit.quantizers.functional.PROLOGUES` entry that computes ``act``, if any."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is TimmGELU:
        return "gelu"
    if type(act) is TimmGELUTanh:
        return "gelu_tanh"
    if type(act) is nn.ReLU:
        return "relu"
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


@register_quant_module(Mlp)
class QuantMlp(QuantModule, Mlp):
    """``fc2(act(fc1(x)))`` as timm computes it, except in training with recomputation (see
    :mod:`qvit.nn.recompute`): there ``fc2`` keeps ``fc1``'s output instead of the activation's and applies the
    activation inside its quantizer's kernels, forward and backward. That saves storing the activation
    (``[B, N, hidden]``) and a pass over it each way; the arithmetic is the same.

    Used when the activation is GELU (exact or tanh) or ReLU, dropout between the layers is off, there is no norm
    between them, and no hooks watch ``act`` or ``fc2``; otherwise timm's forward runs unchanged. The module has no
    quantizers of its own (``fc1`` and ``fc2`` are ``QuantLinear``)."""

    quant_slots = ()

    def fused_prologue(self) -> Optional[str]:
        """The activation to apply inside ``fc2``'s kernels in this forward pass, or ``None`` for timm's forward."""
        fc2 = self.fc2
        if not isinstance(fc2, QuantLinear) or not can_recompute(fc2, (fc2.input_quantizer, fc2.weight_quantizer)):
            return None
        drop = self.drop1
        if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
            return None
        if not isinstance(self.norm, nn.Identity) or _global_forward_hooks or _global_forward_pre_hooks:
            return None
        if any(_hooked(m) for m in (self.act, drop, self.norm, fc2)):
            return None
        return _prologue_name(self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prologue = self.fused_prologue()
        if prologue is None:
            return Mlp.forward(self, x)
        return self.drop2(quant_linear(self.fc2, self.fc1(x), prologue))
