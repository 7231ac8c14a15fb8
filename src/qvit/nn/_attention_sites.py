"""The quantized core shared by attention modules: q·kᵀ, softmax and probs·v with quantized operands."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backend import get_backend
from .base import QuantModule
from .functional import scaled_matmul


class QuantAttentionCore(QuantModule):
    """Attention sites ``q``, ``k``, ``v`` (``[B, heads, N, head_dim]``) and ``probs`` (``[B, heads, N, N]``).

    ``scale_after_matmul`` decides whether the ``head_dim^-0.5`` scale multiplies the logits (the order
    RepQ-ViT uses for ViT, so the ``q`` quantizer sees raw queries) or the queries before they are
    quantized (Swin's order). It does not change the float result.

    ``tap``, when set, is called as ``tap(module, name, tensor)`` with the float operands ``q``, ``k``,
    ``probs``, ``v`` (as their quantizers receive them) and the products ``logits`` (``q̂ k̂ᵀ``, scaled, before
    any bias or mask) and ``context`` (``p̂ v̂``): calibration procedures use it to capture operands, outputs and
    (with tensor hooks) output gradients. It must not change the tensors.

    :meth:`attention` offers the computation to the backend first (in training, :mod:`qvit.kernels` keeps only the
    float ``q``, ``k``, ``v`` and the softmax output for the backward pass and recomputes the quantized operands
    there, unless a tap is set or attention dropout is active). When the
    config leaves every attention site in floating point (no quantizer; a quantizer merely disabled keeps the explicit
    path, so toggling it does not change the arithmetic) and nothing is tapped or added to the logits, it runs
    PyTorch's fused ``scaled_dot_product_attention`` where timm would (the module's ``fused_attn``; like timm's own
    fused path, attention dropout then draws its mask inside the kernel and ``attn_drop`` hooks do not fire).
    """

    quant_slots = (("q", False), ("k", False), ("v", False), ("probs", False))
    quant_flags = ("scale_after_matmul",)
    scale_after_matmul: bool = True
    tap: Optional[Callable[[torch.nn.Module, str, torch.Tensor], None]] = None

    def _tapped(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            self.tap(self, name, x)
        return x

    def quantizes_attention(self) -> bool:
        """Whether any of ``q``, ``k``, ``v``, ``probs`` has a quantizer."""
        return any(getattr(self, f"{name}_quantizer") is not None for name, _ in self.quant_slots)

    def logit_operands(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q̂, k̂ᵀ)``: the scaled logits are ``logit_factor(scale) · q̂ k̂ᵀ`` ``[B, heads, N, N]``."""
        if not self.scale_after_matmul:
            q = q * scale
        q = self._quant("q", self._tapped("q", q))
        k = self._quant("k", self._tapped("k", k))
        return q, k.transpose(-2, -1)

    def logit_factor(self, scale: float) -> float:
        """The factor that multiplies ``q̂ k̂ᵀ``: ``scale``, or 1 where the queries were scaled before quantization."""
        return scale if self.scale_after_matmul else 1.0

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled logits ``q̂ k̂ᵀ`` ``[B, heads, N, N]`` from quantized queries and keys."""
        return self._tapped("logits", scaled_matmul(*self.logit_operands(q, k, scale), self.logit_factor(scale)))

    def context_operands(self, probs: torch.Tensor, v: torch.Tensor,
                         dropout: Optional[torch.nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the context: ``quant(probs)`` ``[B, heads, N, N]`` (after ``dropout``) and ``quant(v)``
        ``[B, heads, N, head_dim]``, for the softmax output ``probs``."""
        probs = self._quant("probs", self._tapped("probs", probs))
        if dropout is not None:
            probs = dropout(probs)
        return probs, self._quant("v", self._tapped("v", v))

    def attention_operands(self, logits: torch.Tensor, v: torch.Tensor,
                           dropout: Optional[torch.nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`context_operands` of ``softmax(logits)`` and ``v``."""
        return self.context_operands(logits.softmax(dim=-1), v, dropout)

    def attend(self, logits: torch.Tensor, v: torch.Tensor, dropout: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """``quant(softmax(logits)) · quant(v)`` ``[B, heads, N, head_dim]``."""
        probs, v = self.attention_operands(logits, v, dropout)
        return self._tapped("context", probs @ v)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dropout: Optional[torch.nn.Module] = None,
                  add_to_logits: Optional[Callable[..., torch.Tensor]] = None,
                  logit_terms: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The context ``[B, heads, N, head_dim]`` of quantized attention over ``q``, ``k``, ``v``.

        ``add_to_logits(logits, *logit_terms)``, when given, returns the logits with biases or masks added;
        tensors that need gradients (e.g. a relative position bias) must come in through ``logit_terms``.
        """
        if self.tap is None and add_to_logits is None and getattr(self, "fused_attn", True) \
                and not self.quantizes_attention():
            # no attention site is quantized: PyTorch's fused kernel computes the same
            dropping = dropout is not None and dropout.training and getattr(dropout, "p", 0.0) > 0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout.p if dropping else 0.0, scale=scale)
        out = get_backend().attention(self, q, k, v, scale, dropout, add_to_logits, logit_terms)
        if out is not None:
            return out
        logits = self.attention_logits(q, k, scale)
        if add_to_logits is not None:
            logits = add_to_logits(logits, *logit_terms)
        probs, v = self.attention_operands(logits, v, dropout)
        return self._tapped("context", probs @ v)
