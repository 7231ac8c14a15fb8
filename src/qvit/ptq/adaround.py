"""AdaRound (Nagel et al., ICML 2020; as used by BRECQ and QDrop): learn whether each weight rounds up or down.

For a uniform weight quantizer with step ``s`` and zero-point ``z`` (per column, frozen), each weight keeps its
floor ``⌊w/s⌋`` and learns a rounding variable ``V`` through the rectified sigmoid
``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1)::

    soft:  ŵ = s · (clamp(⌊w/s⌋ + h(V) + z, qmin, qmax) - z)           (training)
    hard:  ŵ = s · (clamp(⌊w/s⌋ + [V >= 0] + z, qmin, qmax) - z)       (after training)

``V`` starts where ``h(V)`` equals the fractional part of ``w/s`` (so the soft weight starts at ``w``, clipping
aside). The regularizer ``Σ 1 - |2h(V) - 1|^β`` pushes every ``h`` to 0 or 1; β decays linearly from 20 to 2 after a
warm-up (20 % of the iterations) during which the regularizer is off (BRECQ's ``LinearTempDecay``).
:func:`commit` writes the hard-rounded weights into the float weights, which then lie on the quantizer's grid, so
the unchanged weight quantizer reproduces them exactly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

from ..nn.base import QuantModule
from ..quantizers.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """The rounding variable ``V`` (same shape as the weight) of one quantized layer's weight."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        q = getattr(layer, "weight_quantizer", None)
        if not isinstance(q, UniformQuantizer) or not q.enabled or not bool(q.calibrated):
            raise ValueError(f"AdaRound needs a calibrated, enabled uniform weight quantizer "
                             f"(got {type(q).__name__} at {getattr(q, 'site', '?')})")
        self.layer = (layer,)          # not a submodule: V is the only parameter here
        self.quantizer = q
        w = layer.weight.detach()
        scale = q.expand(q.scale, w)
        floor = torch.floor(w / scale)
        rest = (w / scale - floor).clamp(0, 1)
        # h(V) = rest  <=>  σ(V) = (rest - γ) / (ζ - γ)
        self.register_buffer("floor", floor)
        self.V = nn.Parameter(torch.logit((rest - GAMMA) / (ZETA - GAMMA)))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def _dequant(self, rounding: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        w = self.layer[0].weight
        scale, zero = q.expand(q.scale, w), q.expand(q.zero_point, w)
        if q.symmetric:
            zero = torch.zeros_like(zero)
        qmin, qmax = q.code_range()
        return scale * (torch.clamp(self.floor + rounding + zero, qmin, qmax) - zero)

    def soft(self) -> torch.Tensor:
        """The weight with learned soft rounding (differentiable in ``V``)."""
        return self._dequant(self.h())

    def hard(self) -> torch.Tensor:
        """The weight rounded up where ``V >= 0``, down elsewhere."""
        return self._dequant((self.V >= 0).to(self.floor.dtype)).detach()

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ 1 - |2h(V) - 1|^β`` (0-d)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def beta_at(step: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """BRECQ's linear temperature decay: ``start`` until ``warmup * iters``, then linearly down to ``end``."""
    warm = int(warmup * iters)
    if step < warm:
        return start
    rel = (step - warm) / max(1, iters - warm)
    return end + (start - end) * max(0.0, 1.0 - rel)


def adaround_layers(module: nn.Module) -> List[nn.Module]:
    """Quantized layers in ``module`` with an enabled uniform weight quantizer."""
    return [m for m in module.modules() if isinstance(m, QuantModule)
            and isinstance(getattr(m, "weight_quantizer", None), UniformQuantizer) and m.weight_quantizer.enabled]


@contextlib.contextmanager
def adaround(module: nn.Module) -> Iterator[List[AdaRoundWeight]]:
    """Inside the context every eligible weight quantizer of ``module`` returns the soft-rounded weight of its
    :class:`AdaRoundWeight` (yielded, to be trained). Nothing is written back: call :func:`commit` for that."""
    states: List[AdaRoundWeight] = [AdaRoundWeight(layer) for layer in adaround_layers(module)]
    handles = []
    for state in states:
        def hook(q: nn.Module, args: Tuple[torch.Tensor, ...], out: torch.Tensor,
                 state: AdaRoundWeight = state) -> torch.Tensor:
            return state.soft()
        handles.append(state.quantizer.register_forward_hook(hook))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def commit(states: List[AdaRoundWeight]) -> None:
    """Replace each layer's float weight by its hard-rounded value (on the weight quantizer's grid)."""
    for state in states:
        state.layer[0].weight.copy_(state.hard())
