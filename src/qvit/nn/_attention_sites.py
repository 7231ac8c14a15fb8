"""The quantized core shared by attention modules: q·kᵀ, softmax and probs·v with quantized operands."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import QuantModule
from .recompute import can_recompute, quantizer_parameters, recomputed_matmul


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · (a @ b)`` for ``a`` ``[..., n, k]`` and ``b`` ``[..., k, m]`` with equal batch dimensions, the factor
    applied inside the matrix product (no separate pass over the ``[..., n, m]`` result)."""
    if alpha == 1.0:
        return a @ b
    batch = a.shape[:-2]
    out = torch.baddbmm(a.new_zeros(()), a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), beta=0.0,
                        alpha=alpha)
    return out.reshape(*batch, *out.shape[-2:])


class QuantAttentionCore(QuantModule):
    """Attention sites ``q``, ``k``, ``v`` (``[B, heads, N, head_dim]``) and ``probs`` (``[B, heads, N, N]``).

    ``scale_after_matmul`` decides whether the ``head_dim^-0.5`` scale multiplies the logits (the order
    RepQ-ViT uses for ViT, so the ``q`` quantizer sees raw queries) or the queries before they are
    quantized (Swin's order). It does not change the float result.

    ``tap``, when set, is called as ``tap(module, name, tensor)`` with the float operands ``q``, ``k``,
    ``probs``, ``v`` (as their quantizers receive them) and the products ``logits`` (``q̂ k̂ᵀ``, scaled, before
    any bias or mask) and ``context`` (``p̂ v̂``): calibration procedures use it to capture operands, outputs and
    (with tensor hooks) output gradients. It must not change the tensors.

    In training, :meth:`attention` keeps only the float ``q``, ``k``, ``v`` for the backward pass and recomputes
    the rest there (see :mod:`qvit.nn.recompute`), unless a tap is set or attention dropout is active. When the
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

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled logits ``q̂ k̂ᵀ`` ``[B, heads, N, N]`` from quantized queries and keys."""
        if not self.scale_after_matmul:
            q = q * scale
        q = self._quant("q", self._tapped("q", q))
        k = self._quant("k", self._tapped("k", k))
        return self._tapped("logits", scaled_matmul(q, k.transpose(-2, -1), scale if self.scale_after_matmul else 1.0))

    def attention_operands(self, logits: torch.Tensor, v: torch.Tensor,
                           dropout: Optional[torch.nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the context: ``quant(softmax(logits))`` ``[B, heads, N, N]`` (after ``dropout``) and
        ``quant(v)`` ``[B, heads, N, head_dim]``."""
        probs = self._quant("probs", self._tapped("probs", logits.softmax(dim=-1)))
        if dropout is not None:
            probs = dropout(probs)
        return probs, self._quant("v", self._tapped("v", v))

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
        def operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     *terms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            logits = self.attention_logits(q, k, scale)
            if add_to_logits is not None:
                logits = add_to_logits(logits, *terms)
            return self.attention_operands(logits, v, dropout)

        quantizers = [getattr(self, f"{name}_quantizer") for name, _ in self.quant_slots]
        dropping = dropout is not None and dropout.training and getattr(dropout, "p", 0.0) > 0
        if self.tap is None and add_to_logits is None and getattr(self, "fused_attn", True) \
                and all(quantizer is None for quantizer in quantizers):
            # no attention site is quantized: PyTorch's fused kernel computes the same
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout.p if dropping else 0.0, scale=scale)
        if self.tap is None and not dropping and can_recompute(self, quantizers):
            return recomputed_matmul(operands, (q, k, v, *logit_terms), quantizer_parameters(quantizers))
        probs, v = operands(q, k, v, *logit_terms)
        return self._tapped("context", probs @ v)
