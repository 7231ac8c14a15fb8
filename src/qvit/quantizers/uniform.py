"""Uniform (integer-grid) quantizer: symmetric or asymmetric, per tensor / channel / group."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from ..backend import get_backend
from .functional import FakeQuantArgs, affine_fake_quant
from .ranges import select_by_error



@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    """``q = clamp(round(x / s) + z, qmin, qmax)``, ``x̂ = (q - z) * s``.

    Symmetric grids have ``z = 0`` and the signed range ``[-2^(b-1), 2^(b-1) - 1]`` (or ``[0, 2^b - 1]``
    when the data is unsigned); asymmetric grids use ``[0, 2^b - 1]`` with an integer zero-point.
    The clipping range comes from the ``init`` range estimator (``minmax``, ``percentile``, ``mse``).

    Args:
        include_zero: widen the calibrated range to contain 0 so that zero is exactly representable.
    """

    def __init__(self, bits: int = 8, *, include_zero: bool = True, **kwargs) -> None:
        super().__init__(bits, **kwargs)
        self.include_zero = include_zero
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))

    # integer range ---------------------------------------------------------------------------
    def code_range(self) -> Tuple[int, int]:
        if self.symmetric and self.signed is not False:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"scale": self.scale}

    # calibration -----------------------------------------------------------------------------
    def range_to_params(self, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point for the clipping range ``[lo, hi]`` (per column)."""
        qmin, qmax = self.code_range()
        if self.include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if self.symmetric:
            if qmin < 0:
                scale = torch.maximum(lo.abs() * (qmax / -qmin), hi.abs()) / qmax
            else:
                scale = hi.clamp(min=0) / qmax
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (qmax - qmin)
            scale = scale.clamp(min=MIN_SCALE)
            zero = torch.round(qmin - lo / scale)
            if self.include_zero:
                zero = zero.clamp(qmin, qmax)
        return scale.clamp(min=MIN_SCALE), zero

    def _error(self, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zero = self.range_to_params(lo, hi)
        qmin, qmax = self.code_range()
        return (affine_fake_quant(cols, scale, None, qmin - zero, qmax - zero) - cols).pow(2).mean(0)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        lo, hi = select_by_error(cols, *self.candidate_ranges(cols), self._error)
        scale, zero = self.range_to_params(lo, hi)
        self.set_params(scale, zero)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set per-column scale and zero-point directly (both ``[columns]``)."""
        device = self.scale.device
        set_tensor(self, "scale", scale.detach().float().reshape(-1).to(device))
        set_tensor(self, "zero_point", zero_point.detach().float().reshape(-1).to(device))

    # forward / codes -------------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return get_backend().fake_quant(x, self.fake_quant_args(x))

    def fake_quant_args(self, x: torch.Tensor) -> FakeQuantArgs:
        qmin, qmax = self.code_range()
        scale = self.expand(self.scale, x)
        if self.symmetric:
            return FakeQuantArgs(scale, None, qmin, qmax)
        zero = self.expand(self.zero_point, x)
        return FakeQuantArgs(scale, None, qmin - zero, qmax - zero)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.equal(self.zero_point, torch.round(self.zero_point)):
            raise ValueError(f"{self._name()}: the zero-point is fractional (e.g. RepQ-ViT's unrounded mean), so "
                             "the codes are not integers; reparameterize with round_zero_point to export codes")
        qmin, qmax = self.code_range()
        q = torch.round(x / self.expand(self.scale, x)) + self.expand(self.zero_point, x)
        return torch.clamp(q, qmin, qmax).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.expand(self.zero_point, codes)) * self.expand(self.scale, codes)

    def affine_form(self):
        zero = self.zero_point if not self.symmetric else torch.zeros_like(self.scale)
        if not torch.equal(zero, torch.round(zero)):
            return None
        return (self.scale.detach(), zero.detach(), *self.code_range())

    def integer_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-rounding position ``x / s + z`` (shape of ``x``, in integer steps; codes are its clamped rounding).

        Oscillation tracking reads it (distance to the rounding threshold, clipping)."""
        v = x / self.expand(self.scale, x)
        return v if self.symmetric else v + self.expand(self.zero_point, x)

    def config(self):
        return {**super().config(), "include_zero": self.include_zero}
