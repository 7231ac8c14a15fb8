"""Query-key reparameterization (OFQ, Liu et al. ICML 2023) for timm ``Attention``.

Instead of quantizing the query and key weights and activations separately (four quantizers whose errors interact),
each head's logits are computed from the product ``W_qk[h] = W_q,hᵀ W_k,h`` (``C x C``)::

    x̂ = qkv.input_quantizer(x)                           [B, N, C]
    t[h] = quant_qkx( Q_w(W_qk)[h] · x̂ᵀ )                 [B, H, C, N]   (``qkx``, per head)
    logits[h] = (x̂ · t[h] + (x̂ · u_h)ᵀ) · d^-1/2,  u_h = W_k,hᵀ b_q,h

``Q_w`` (slot ``qk_weight``, OFQ: StatsQ per row) quantizes ``W_qk`` reshaped to ``[H·C, C]``; its straight-through
gradient reaches ``W_q`` and ``W_k`` through the product. Biases: the key bias only adds terms constant along the
key axis, which the softmax cancels; the query bias adds ``b_q,hᵀ W_k,h x_j``, which depends on the key, so it is
kept as the per-head key bias ``u_h`` (OFQ's code drops both biases, changing the function). In floating point the
attention output is therefore unchanged. Values, the softmax output and ``proj`` keep their own quantizers.
Cost: per head ``N·C² + N²·C`` multiply-adds instead of ``N·C·d + N²·d``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers import create_quantizer
from .quant_attention import QuantAttention
from .weight_site import WeightSite

if TYPE_CHECKING:
    from ..config import QuantConfig


def enable_qkr(model: nn.Module, config: "QuantConfig") -> List[str]:
    """Switch every ``QuantAttention`` of a prepared model to QKR; returns the new sites' names.

    The new sites ``<attn>.qk_weight`` (role ``attn.qk_weight``, built as a weight site: ``config.weight``, then the
    role, ``w_bits`` by default) and ``<attn>.qkx`` (role ``attn.qkx``, an activation site) get their specs from
    ``config`` as every other site does. Both start uncalibrated, like the rest of a freshly prepared model; the
    ``qk_weight`` quantizer is not a fixed-tensor weight quantizer (its input changes whenever ``W_q`` or ``W_k``
    does). This is the ``query_key_reparameterization`` transform of :class:`~qvit.QuantConfig`.
    """
    sites = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantAttention) or m.qkr:
            continue
        if not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity):
            raise ValueError(f"{name}: QKR needs attention without q/k normalization")
        prefix = m.quant_roles.get("q", "attn.q").rpartition(".")[0]
        slots = []
        for slot, is_weight in (("qk_weight", True), ("qkx", False)):
            site = f"{name}.{slot}" if name else slot
            spec = config.spec_for(site, f"{prefix}.{slot}", is_weight)
            q = None
            if spec.enabled:
                q = create_quantizer(spec).to(m.qkv.weight.device)
                q.site = site
            setattr(m, f"{slot}_quantizer", q)
            m.quant_roles[slot] = f"{prefix}.{slot}"
            slots.append((slot, False))
            sites.append(site)
        m.q_quantizer = m.k_quantizer = None          # the logits no longer use q and k
        m.extra_quant_slots = tuple(slots)
        m.qkr = True
    if not sites:
        raise ValueError("query_key_reparameterization: the model has no quantized timm Attention module")
    return sites


def qk_product(m: QuantAttention) -> torch.Tensor:
    """The per-head products ``W_q,hᵀ W_k,h`` of module ``m``'s float query and key rows, stacked ``[H·C, C]`` (the
    tensor the ``qk_weight`` quantizer rounds, one row per head and input channel)."""
    H, d = m.num_heads, m.head_dim
    C = m.qkv.weight.shape[1]
    wq = m.qkv.weight[:H * d].reshape(H, d, C)
    wk = m.qkv.weight[H * d:2 * H * d].reshape(H, d, C)
    return (wq.transpose(1, 2) @ wk).reshape(H * C, C)


def qkr_weight_sites(m: QuantAttention, name: str) -> List[WeightSite]:
    """The weight sites of a QKR attention module named ``name``: the value rows of ``qkv`` (the only rows its weight
    quantizer's output is used for) and the product ``W_qk`` (:func:`qk_product`) in the ``qk_weight`` quantizer."""
    qkv_name = f"{name}.qkv" if name else "qkv"
    sites = []
    if getattr(m.qkv, "weight_quantizer", None) is not None:
        hd = m.num_heads * m.head_dim
        sites.append(WeightSite(f"{qkv_name}.weight", qkv_name, m.qkv, m.qkv.weight_quantizer,
                                parameter=m.qkv.weight, rows=slice(2 * hd, 3 * hd)))
    if m.qk_weight_quantizer is not None:
        sites.append(WeightSite(f"{name}.qk_weight" if name else "qk_weight", qkv_name, m.qkv,
                                m.qk_weight_quantizer, compute=lambda: qk_product(m)))
    return sites


def qkr_forward(m: QuantAttention, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The QKR attention forward of module ``m`` on ``x`` ``[B, N, C]`` (see the module docstring)."""
    B, N, C = x.shape
    H, d = m.num_heads, m.head_dim
    xq = m.qkv._quant("input", x)
    w = m.qkv._quant("weight", m.qkv.weight)
    bias = m.qkv.bias
    v = F.linear(xq, w[2 * H * d:], bias[2 * H * d:] if bias is not None else None)
    v = v.reshape(B, N, H, d).permute(0, 2, 1, 3)
    wk = m.qkv.weight[H * d:2 * H * d].reshape(H, d, C)
    w_qk = m._quant("qk_weight", qk_product(m)).reshape(H, C, C)
    t = m._quant("qkx", torch.einsum("hcd,bnd->bhcn", w_qk, xq))
    logits = torch.einsum("bnc,bhcm->bhnm", xq, t)
    if bias is not None:
        u = torch.einsum("hdc,hd->hc", wk, bias[:H * d].reshape(H, d))
        logits = logits + torch.einsum("bmc,hc->bhm", xq, u).unsqueeze(2)
    logits = logits * m.scale
    if attn_mask is not None:
        logits = logits + attn_mask
    out = m.attend(logits, v, m.attn_drop)
    out = out.transpose(1, 2).reshape(B, N, H * d)
    out = m.norm(out) if hasattr(m, "norm") else out
    return m.proj_drop(m.proj(out))
