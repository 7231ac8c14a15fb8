"""OFQ's confidence-guided annealing (Liu et al., ICML 2023): train only the weights close to a rounding threshold.

A weight's confidence is the distance of its pre-rounding value ``v`` (the quantizer's ``integer_domain``; for StatsQ
``clamp(w/s, -1, 1-1e-6)·2^(b-1) - 0.5``) to the nearest interior rounding threshold ``i + 1/2``, ``i`` from the
smallest code in the tensor up to (not including) the largest (``cga.py``). Weights within ``boundary_range`` (in
integer steps; OFQ's default 0.005) of such a threshold stay trainable; every other weight is frozen: its gradient is
zeroed before the optimizer step and its value restored after it (which also undoes weight decay and momentum drift).
The mask is recomputed at every step. OFQ runs this stage for 30 epochs at lr 1e-5 after the main training.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.prepare import iter_weight_sites
from ..nn import WeightSite
from ..quantizers import Quantizer


def confidence_mask(quantizer: Quantizer, weight: torch.Tensor, boundary_range: float = 0.005) -> torch.Tensor:
    """``True`` where a weight is confident (far from every interior threshold): the weights CGA freezes."""
    fn = getattr(quantizer, "integer_domain", None)
    if fn is None:
        raise ValueError(f"{type(quantizer).__name__} has no integer_domain; CGA needs the pre-rounding value")
    with torch.no_grad():
        return confident(fn(weight.detach()), boundary_range)


def confident(v: torch.Tensor, boundary_range: float = 0.005) -> torch.Tensor:
    """``True`` where the pre-rounding positions ``v`` (integer steps) lie farther than ``boundary_range`` from every
    interior threshold ``i + 1/2`` (``i`` from the smallest code in ``v`` up to, not including, the largest)."""
    if not 0 < boundary_range < 0.5:
        raise ValueError(f"boundary_range must be in (0, 0.5), got {boundary_range}")
    r = torch.round(v)
    i = torch.round(v - 0.5)                 # the threshold i + 1/2 nearest to v
    near = (v - 0.5 - i).abs() <= boundary_range
    interior = (i >= r.min()) & (i < r.max())
    return ~(near & interior)


class ConfidenceGuidedAnnealing:
    """Applies CGA to the weight sites (:class:`~qvit.nn.WeightSite`) of the layers whose names end with one of
    ``suffixes`` (OFQ: ``fc1``, ``fc2``, ``proj`` and the value projection; DeiT only inside ``blocks``). Call
    :meth:`before_step` after ``backward()`` and :meth:`after_step` after ``optimizer.step()``.

    A site that is (rows of) a parameter is frozen by zeroing the gradients of its confident entries and restoring
    their values after the step. A computed site (QKR's product ``W_qᵀ W_k``) cannot be written back: with
    ``gate_products`` its quantizer passes the straight-through gradient only through its low-confidence entries
    (``ŵ = Q(w).detach() + (w - w.detach())·(1 - confident)``), so the query and key weights learn only from them.
    OFQ's code meant to do this but its mask is a no-op; ``gate_products=False`` reproduces that. The gate acts in
    the forward passes for which ``gate_active()`` is true (always, by default).
    """

    def __init__(self, model: nn.Module, boundary_range: float = 0.005,
                 suffixes: Sequence[str] = ("fc1", "fc2", "proj", "v", "qkv", "reduction"),
                 within: Optional[str] = None, gate_products: bool = True) -> None:
        self.boundary_range = boundary_range
        self.sites: List[WeightSite] = []
        self.products: List[WeightSite] = []
        for site in iter_weight_sites(model):
            if site.layer_name.rsplit(".", 1)[-1] not in suffixes:
                continue
            if within is not None and within not in site.layer_name.split("."):
                continue
            if site.parameter is not None:
                self.sites.append(site)
            elif gate_products:
                self.products.append(site)
        if not self.sites and not self.products:
            raise ValueError(f"CGA found no quantized weight in layers named {tuple(suffixes)}")
        if not 0 < boundary_range < 0.5:
            raise ValueError(f"boundary_range must be in (0, 0.5), got {boundary_range}")
        for site in self.sites + self.products:
            if getattr(site.quantizer, "integer_domain", None) is None:
                raise ValueError(f"{site.site}: {type(site.quantizer).__name__} has no integer_domain; CGA needs the "
                                 "pre-rounding value")
        self.gate_active: Callable[[], bool] = lambda: True
        self._gated: Dict[str, Tuple[int, int]] = {}
        self._handles = [site.quantizer.register_pure_forward_hook(self._gate_hook(site.site)) for site in self.products]
        self._saved: Dict[str, tuple] = {}

    def _gate_hook(self, name: str) -> Callable:
        # the output depends only on the quantizer's input, and a repeated pass rewrites the same count
        def hook(quantizer: Quantizer, args: Tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            w = args[0]
            if not (torch.is_grad_enabled() and w.requires_grad) or not quantizer.enabled or quantizer.observing \
                    or not self.gate_active():
                return out
            mask = confidence_mask(quantizer, w, self.boundary_range)
            self._gated[name] = (int((~mask).sum()), mask.numel())
            return torch.where(mask, out.detach(), out)
        return hook

    def remove(self) -> None:
        """Take the gradient gates off the computed sites (the model no longer refers to this object)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def before_step(self) -> float:
        """Zero the gradients of confident weights and remember their values; returns the trainable fraction (of the
        parameter sites, and of the computed sites gated in the last forward pass)."""
        trainable = total = 0
        for site in self.sites:
            weight = site.value()
            mask = confident(site.grid_position(), self.boundary_range)
            grad = site.parameter.grad
            if grad is not None:
                (grad if site.rows is None else grad[site.rows])[mask] = 0
            self._saved[site.site] = (mask, weight[mask])         # boolean indexing copies
            trainable += int((~mask).sum())
            total += mask.numel()
        for n_trainable, n in self._gated.values():
            trainable += n_trainable
            total += n
        self._gated.clear()
        return trainable / total if total else 1.0

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the confident weights back to their values from before the step."""
        for site in self.sites:
            mask, values = self._saved.pop(site.site)
            site.value()[mask] = values
