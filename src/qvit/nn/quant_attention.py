"""QuantAttention: timm's ``Attention`` with explicit, quantizable q·kᵀ, softmax and probs·v."""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers.attention import Attention

try:
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
except ImportError:  # timm releases before attention-mask resolution was factored out
    def resolve_self_attn_mask(n: int, attn: torch.Tensor, attn_mask: Optional[torch.Tensor],
                               is_causal: bool = False) -> Optional[torch.Tensor]:
        if is_causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=attn.device).triu_(1)
            return torch.zeros(n, n, dtype=attn.dtype, device=attn.device).masked_fill_(causal, float("-inf"))
        return attn_mask

    def maybe_add_mask(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return attn if mask is None else attn + mask

from ._attention_sites import QuantAttentionCore
from ._registry import register_quant_module


@register_quant_module(Attention)
class QuantAttention(QuantAttentionCore, Attention):
    """timm ``Attention`` (ViT, DeiT) computed without the fused kernel so every operand is a site.

    ``qkv`` and ``proj`` are ordinary linear layers and are quantized as ``QuantLinear`` on their own.
    """

    quant_flags = ("scale_after_matmul", "qkr")

    def _init_quant(self) -> None:
        self.scale_after_matmul = True
        self.qkr = False

    def slots(self):
        if self.qkr:    # QKR computes the logits from W_qk: the query and key sites are gone
            return tuple(s for s in super().slots() if s[0] not in ("q", "k"))
        return super().slots()

    def weight_sites(self, name: str):
        if self.qkr:
            from .qkr import qkr_weight_sites
            return iter(qkr_weight_sites(self, name))
        return super().weight_sites(name)

    def float_weights_read(self):
        return ("qkv",) if self.qkr else ()   # QKR multiplies the float q/k rows

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        if self.qkr:
            from .qkr import qkr_forward
            if getattr(self, "gate", None) is not None or is_causal:
                raise ValueError("QKR supports plain (ungated, non-causal) attention only")
            return qkr_forward(self, x, attn_mask)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = resolve_self_attn_mask(N, q, attn_mask, is_causal)
        x = self.attention(q, k, v, self.scale, self.attn_drop,
                           None if mask is None else (lambda logits: maybe_add_mask(logits, mask)))
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
