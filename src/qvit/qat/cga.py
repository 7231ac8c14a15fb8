"""OFQ's confidence-guided annealing (Liu et al., ICML 2023): train only the weights close to a rounding threshold.

A weight's confidence is the distance of its pre-rounding value ``v`` (the quantizer's ``integer_domain``; for StatsQ
``clamp(w/s, -1, 1-1e-6)·2^(b-1) - 0.5``) to the nearest interior rounding threshold ``i + 1/2``, ``i`` from the
smallest code in the tensor up to (not including) the largest (``cga.py``). Weights within ``boundary_range`` (in
integer steps; OFQ's default 0.005) of such a threshold stay trainable; every other weight is frozen: its gradient is
zeroed before the optimizer step and its value restored after it (which also undoes weight decay and momentum drift).
The mask is recomputed at every step. OFQ runs this stage for 30 epochs at lr 1e-5 after the main training.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..models.prepare import iter_quantizers
from ..quantizers import Quantizer


def confidence_mask(quantizer: Quantizer, weight: torch.Tensor, boundary_range: float = 0.005) -> torch.Tensor:
    """``True`` where a weight is confident (far from every interior threshold): the weights CGA freezes."""
    if not 0 < boundary_range < 0.5:
        raise ValueError(f"boundary_range must be in (0, 0.5), got {boundary_range}")
    fn = getattr(quantizer, "integer_domain", None)
    if fn is None:
        raise ValueError(f"{type(quantizer).__name__} has no integer_domain; CGA needs the pre-rounding value")
    with torch.no_grad():
        v = fn(weight.detach())
        r = torch.round(v)
        i = torch.round(v - 0.5)                 # the threshold i + 1/2 nearest to v
        near = (v - 0.5 - i).abs() <= boundary_range
        interior = (i >= r.min()) & (i < r.max())
        return ~(near & interior)


class ConfidenceGuidedAnnealing:
    """Applies CGA to the weights of the layers whose names end with one of ``suffixes`` (OFQ: ``fc1``, ``fc2``,
    ``proj`` and the value projection; DeiT only inside ``blocks``). Call :meth:`before_step` after ``backward()``
    and :meth:`after_step` after ``optimizer.step()``."""

    def __init__(self, model: nn.Module, boundary_range: float = 0.005,
                 suffixes: Sequence[str] = ("fc1", "fc2", "proj", "v", "qkv", "reduction"),
                 within: Optional[str] = None) -> None:
        self.boundary_range = boundary_range
        self.layers: List[tuple] = []
        for site, _, q in iter_quantizers(model):
            layer_name, _, slot = site.rpartition(".")
            if slot != "weight" or not layer_name.rsplit(".", 1)[-1] in suffixes:
                continue
            if within is not None and within not in layer_name.split("."):
                continue
            self.layers.append((layer_name, model.get_submodule(layer_name), q))
        if not self.layers:
            raise ValueError(f"CGA found no quantized weight in layers named {tuple(suffixes)}")
        self._saved: Dict[str, tuple] = {}

    @torch.no_grad()
    def before_step(self) -> float:
        """Zero the gradients of confident weights and remember their values; returns the trainable fraction."""
        trainable = total = 0
        for name, layer, q in self.layers:
            mask = confidence_mask(q, layer.weight, self.boundary_range)
            if layer.weight.grad is not None:
                layer.weight.grad[mask] = 0
            self._saved[name] = (mask, layer.weight[mask].clone())
            trainable += int((~mask).sum())
            total += mask.numel()
        return trainable / total

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the confident weights back to their values from before the step."""
        for name, layer, _ in self.layers:
            mask, values = self._saved.pop(name)
            layer.weight[mask] = values
