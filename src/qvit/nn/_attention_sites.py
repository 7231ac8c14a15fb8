"""The quantized core shared by attention modules: q·kᵀ, softmax and probs·v with quantized operands."""
from __future__ import annotations

from typing import Optional

import torch

from .base import QuantModule


class QuantAttentionCore(QuantModule):
    """Attention sites ``q``, ``k``, ``v`` (``[B, heads, N, head_dim]``) and ``probs`` (``[B, heads, N, N]``).

    ``scale_after_matmul`` decides whether the ``head_dim^-0.5`` scale multiplies the logits (the order
    RepQ-ViT uses for ViT, so the ``q`` quantizer sees raw queries) or the queries before they are
    quantized (Swin's order). It does not change the float result.
    """

    quant_slots = (("q", False), ("k", False), ("v", False), ("probs", False))
    scale_after_matmul: bool = True

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled logits ``q̂ k̂ᵀ`` ``[B, heads, N, N]`` from quantized queries and keys."""
        if not self.scale_after_matmul:
            q = q * scale
        q = self._quant("q", q)
        k = self._quant("k", k)
        logits = q @ k.transpose(-2, -1)
        return logits * scale if self.scale_after_matmul else logits

    def attend(self, logits: torch.Tensor, v: torch.Tensor, dropout: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """``quant(softmax(logits)) · quant(v)`` ``[B, heads, N, head_dim]``."""
        probs = self._quant("probs", logits.softmax(dim=-1))
        if dropout is not None:
            probs = dropout(probs)
        return probs @ self._quant("v", v)
