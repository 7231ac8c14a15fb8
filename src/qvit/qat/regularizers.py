"""Weight regularizers against oscillation: Nagel et al.'s dampening loss and VVTQ's variation-aware bin regularizer.

Both act on every enabled weight quantizer of a prepared model (the 8-bit first and last layers included, as in the
reference code) and work in the real domain of each quantizer's grid, so any family with ``quantize``/``dequantize``
qualifies.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn as nn

from ..models.prepare import iter_quantizers
from ..quantizers import Quantizer

AGGREGATIONS = ("sum", "mean", "kernel_mean")


def weight_quantizers(model: nn.Module) -> Iterator[Tuple[nn.Module, Quantizer]]:
    """``(layer, quantizer)`` for every enabled, calibrated weight quantizer of a prepared model."""
    for site, _, q in iter_quantizers(model):
        if q.for_weights and q.enabled and bool(q.calibrated):
            yield model.get_submodule(site.rpartition(".")[0]), q


def grid_bounds(quantizer: Quantizer, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest representable values for every element of ``w`` (broadcast to ``w``'s shape)."""
    qmin, qmax = quantizer.code_range()
    lo = quantizer.dequantize(torch.full(w.shape, qmin, dtype=torch.int32, device=w.device))
    hi = quantizer.dequantize(torch.full(w.shape, qmax, dtype=torch.int32, device=w.device))
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def dampening_loss(model: nn.Module, aggregation: str = "kernel_mean") -> torch.Tensor:
    """Nagel et al.'s oscillation dampening ``Σ_layers agg((Q(w).detach() - clamp(w, lo, hi))²)`` (0-d).

    ``Q(w)`` is the layer's quantized weight (frozen-aware), ``lo``/``hi`` its grid's ends. ``aggregation``:
    ``sum``, ``mean``, or ``kernel_mean`` (the reference default: sum over output channels, mean over the rest).
    Its weight gradient is ``2(clamp(w) - Q(w))·[lo < w < hi]`` times the aggregation factor; it pulls latent weights
    to their bin centres.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    total = None
    for layer, q in weight_quantizers(model):
        w = layer.weight
        lo, hi = grid_bounds(q, w.detach())
        d = (q(w).detach() - torch.maximum(torch.minimum(w, hi), lo)).pow(2)
        term = d.sum() if aggregation == "sum" else d.mean() if aggregation == "mean" else d.sum(0).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dampening_loss: the model has no calibrated weight quantizer")
    return total


def bin_regularizer(model: nn.Module) -> torch.Tensor:
    """VVTQ's variation-aware bin regularizer (``util_loss.BinReg``), summed over layers (0-d).

    Per layer: ``mean((Q(w).detach() - clamp(w))²)`` (the pull to the bin centre) plus, for every bin (integer
    level, per quantizer column) holding more than one weight, the unbiased variance of the clamped latent weights in
    it (the pull to the bin mean).
    """
    total = None
    for layer, q in weight_quantizers(model):
        w = layer.weight
        lo, hi = grid_bounds(q, w.detach())
        wc = torch.maximum(torch.minimum(w, hi), lo)
        term = (q(w).detach() - wc).pow(2).mean()
        codes = q.quantize(w.detach()).long()
        qmin, qmax = q.code_range()
        levels = qmax - qmin + 1
        col_vals, col_codes = q.to_columns(wc), q.to_columns(codes)
        cols = torch.arange(col_vals.shape[1], device=w.device).expand_as(col_codes)
        key = (cols * levels + (col_codes - qmin)).reshape(-1)
        vals = col_vals.reshape(-1)
        bins = col_vals.shape[1] * levels
        count = torch.bincount(key, minlength=bins).to(vals.dtype)
        mean = torch.zeros(bins, dtype=vals.dtype, device=w.device).index_add(0, key, vals) / count.clamp(min=1)
        sq = torch.zeros(bins, dtype=vals.dtype, device=w.device).index_add(0, key, (vals - mean[key]).pow(2))
        many = count > 1
        term = term + (sq[many] / (count[many] - 1)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("bin_regularizer: the model has no calibrated weight quantizer")
    return total
