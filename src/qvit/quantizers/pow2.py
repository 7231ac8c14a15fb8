"""Power-of-two (DenseShift-style) quantizer: ``x̂ = sign * s * 2^(-p)``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from .functional import straight_through
from .ranges import list_ranges, select_by_error

PROJECTIONS = ("log", "linear")


@register_quantizer("pow2")
class Pow2Quantizer(Quantizer):
    """Power-of-two grid ``x̂ = sign * s * 2^(-p)``, ``p ∈ {0, ..., P-1}``, per column.

    ``s`` (``[columns]``, the largest magnitude) is ``max(|lo|, |hi|)`` of the clipping range chosen by the
    ``init`` range estimator (``minmax``, ``percentile`` or ``mse``; several candidates are searched by MSE).

    * ``zero_free=True`` (default, DenseShift): 1 sign bit and ``b-1`` exponent bits, ``P = 2^(b-1)``;
      0 is not on the grid (an input 0 maps to ``+s * 2^-(P-1)``).
    * ``zero_free=False``: one code is given to 0, ``P = 2^(b-1) - 1`` magnitudes (2 bits: ``{-s, 0, s}``).

    Projection of a magnitude ``a = |x|`` onto the grid (``t = -log2(a / s)``):

    * ``projection="log"`` (default): nearest level in the log2 domain, ``p = clamp(round(t), 0, P-1)``
      (``torch.round``, half to even). With zero allowed, ``x`` goes to 0 when its rounded exponent falls
      below the grid, ``round(t) > P-1`` (i.e. ``a < s * 2^-(P-1/2)``: zero stands in for ``s * 2^-P``).
    * ``projection="linear"``: nearest level in the linear domain (ties go to the larger magnitude). With
      zero allowed, ``x`` goes to 0 when ``a`` is below half the smallest level, ``a < s * 2^-P``.

    Values above ``s`` go to ``±s``. Gradient: straight-through (1) for ``|x| <= s``, 0 outside.

    Codes (``int32``, increasing with the value), with ``m = P-1-p`` the magnitude rank (0 = smallest):

    * ``zero_free=True``: ``m`` for ``x >= 0`` and ``-1 - m`` for ``x < 0``; range ``[-2^(b-1), 2^(b-1) - 1]``.
    * ``zero_free=False``: 0 for zero, ``m + 1`` for ``x > 0`` and ``-(m + 1)`` for ``x < 0``; range ``[-P, P]``.
    """

    def __init__(self, bits: int = 8, *, zero_free: bool = True, projection: str = "log", symmetric: bool = True,
                 signed: Optional[bool] = None, **kwargs) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"Pow2Quantizer: projection must be one of {PROJECTIONS}, got {projection!r}")
        if not isinstance(zero_free, bool):
            raise ValueError(f"Pow2Quantizer: zero_free must be a bool, got {zero_free!r}")
        if not symmetric:
            raise ValueError("Pow2Quantizer: the power-of-two grid is symmetric; symmetric=False is not supported")
        if signed is False:
            raise ValueError("Pow2Quantizer: the power-of-two grid has a sign bit; signed=False is not supported")
        super().__init__(bits, symmetric=True, signed=True, **kwargs)
        if self.init not in list_ranges():
            raise ValueError(f"Pow2Quantizer: init must be a range estimator {tuple(list_ranges())}, got {self.init!r}")
        self.zero_free = zero_free
        self.projection = projection
        self.register_buffer("scale", torch.ones(1))

    @property
    def num_magnitudes(self) -> int:
        """``P``: how many powers of two the grid holds on each side of zero."""
        half = 1 << (self.bits - 1)
        return half if self.zero_free else half - 1

    def code_range(self) -> Tuple[int, int]:
        p = self.num_magnitudes
        return (-p, p - 1) if self.zero_free else (-p, p)

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"scale": self.scale}

    # grid ------------------------------------------------------------------------------------
    def _exponents(self, x: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exponent ``p`` (float, integer-valued, in ``[0, P-1]``) and the mask of values sent to zero."""
        last = self.num_magnitudes - 1
        mag = x.detach().abs()
        t = -torch.log2(mag / s)
        r = torch.round(t)
        p = r.clamp(0, last)
        if self.projection == "log":
            under = r > last
        else:
            p_next = (p + 1).clamp(max=last)
            closer_next = (mag - s * torch.exp2(-p_next)).abs() < (mag - s * torch.exp2(-p)).abs()
            p = torch.where(closer_next, p_next, p)
            under = mag < s * torch.exp2(torch.full_like(p, -(last + 1.0)))
        if self.zero_free:
            under = torch.zeros_like(under)
        return p, under

    def _codes(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        p, under = self._exponents(x, s)
        m = (self.num_magnitudes - 1) - p
        neg = x.detach() < 0
        if self.zero_free:
            return torch.where(neg, -1 - m, m)
        return torch.where(under, torch.zeros_like(m), torch.where(neg, -(m + 1), m + 1))

    def _values(self, codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Real values of codes (float tensor of integers) for the broadcast scale ``s``."""
        neg = codes < 0
        if self.zero_free:
            m = torch.where(neg, -1 - codes, codes)
        else:
            m = codes.abs() - 1
        mag = s * torch.exp2(m - (self.num_magnitudes - 1))
        out = torch.where(neg, -mag, mag)
        if not self.zero_free:
            out = torch.where(codes == 0, torch.zeros_like(out), out)
        return out

    # calibration -----------------------------------------------------------------------------
    def _error(self, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        s = torch.maximum(lo.abs(), hi.abs()).clamp(min=MIN_SCALE)
        return (self._values(self._codes(cols, s), s) - cols).pow(2).mean(0)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        lo, hi = select_by_error(cols, *self.candidate_ranges(cols), self._error)
        self.set_scale(torch.maximum(lo.abs(), hi.abs()).clamp(min=MIN_SCALE))

    def set_scale(self, scale: torch.Tensor) -> None:
        """Set the per-column largest magnitude ``s`` (``[columns]``) directly."""
        set_tensor(self, "scale", scale.detach().float().reshape(-1).to(self.scale.device))

    # forward / codes -------------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(self.scale, x)
        out = self._values(self._codes(x, s), s).to(x.dtype)
        inside = x.detach().abs() <= s
        return straight_through(x, out, inside)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x, self.expand(self.scale, x)).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes.float(), self.expand(self.scale, codes))

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "zero_free": self.zero_free, "projection": self.projection}
