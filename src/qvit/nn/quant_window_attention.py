"""QuantWindowAttention: Swin's window attention with quantizable q·kᵀ, softmax and probs·v."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.swin_transformer import WindowAttention

from ._attention_sites import QuantAttentionCore
from ._registry import register_quant_module


@register_quant_module(WindowAttention)
class QuantWindowAttention(QuantAttentionCore, WindowAttention):
    """Swin ``WindowAttention`` (``x``: ``[windows*B, N, C]``) with the relative position bias and shift
    mask added to the quantized logits in float. Queries are scaled before quantization, as in Swin."""

    def _init_quant(self) -> None:
        self.scale_after_matmul = False

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        def add_bias_and_mask(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            logits = logits + bias
            if mask is not None:
                num_win = mask.shape[0]
                logits = logits.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                logits = logits.view(-1, self.num_heads, N, N)
            return logits

        x = self.attention(q, k, v, self.scale, self.attn_drop, add_bias_and_mask, (self._get_rel_pos_bias(),))
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
