"""StatsQ (OFQ, Liu et al. 2023): statistics-based, zero-free mid-rise weight quantizer."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from .functional import straight_through

CLIP_HI = 1.0 - 1e-6


@register_quantizer("statsq")
class StatsQQuantizer(Quantizer):
    """OFQ's StatsQ: ``ŵ = s * (k + 0.5) / n`` with a scale recomputed from the tensor at every forward.

    Per column (by default one output row of a weight: ``granularity="channel"``, ``axis=0``; any
    granularity is honoured)::

        s = 2 * mean|W|                      (detached, not learnable)
        c = clamp(W / s, -1, 1 - 1e-6)
        n = 2^(b-1)
        k = round(c * n - 0.5)               (integer code in [-n, n - 1])
        ŵ = s * (k + 0.5) / n                (levels ±s/(2n), ±3s/(2n), ..., no zero)

    The gradient is the identity straight-through estimate: ``dŵ/dW = 1`` everywhere, clipped weights
    included (no clip mask), and no gradient reaches ``s``.

    Calibration is not needed: ``s`` is a statistic of the tensor being quantized. An uncalibrated
    quantizer records ``s`` from its first input and marks itself calibrated (so ``calibrate_lazily`` is
    unnecessary); observing/finalize also works and just records ``s`` from the observed data.
    The ``scale`` buffer (``[columns]``) holds the last ``s`` used: :meth:`fake_quant` refreshes it in
    training mode, :meth:`quantize` always does (both mark the quantizer initialised), and :meth:`dequantize`
    reads it, so codes returned by ``quantize(W)`` dequantize with the scale of ``W`` (also after a
    ``state_dict`` round trip).
    In eval mode :meth:`fake_quant` still uses the statistic of its input and leaves the buffer alone.

    Only ``init="statsq"`` (no range options) is accepted; the grid is always symmetric and signed.
    """

    supported_inits = ("statsq",)

    def __init__(self, bits: int = 8, *, granularity: str = "channel", axis: int = 0, init: str = "statsq",
                 symmetric: bool = True, signed: Optional[bool] = None, **kwargs) -> None:
        if not symmetric:
            raise ValueError("StatsQQuantizer: the StatsQ grid is symmetric; symmetric=False is not supported")
        if signed is False:
            raise ValueError("StatsQQuantizer: the StatsQ grid is signed; signed=False is not supported")
        super().__init__(bits, granularity=granularity, axis=axis, init=init, symmetric=True, signed=True, **kwargs)
        self.register_buffer("scale", torch.ones(1))

    @property
    def half_levels(self) -> int:
        """``n = 2^(b-1)``: the number of levels on each side of zero."""
        return 1 << (self.bits - 1)

    def code_range(self) -> Tuple[int, int]:
        n = self.half_levels
        return -n, n - 1

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"scale": self.scale}

    # statistic -------------------------------------------------------------------------------
    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """Per-column ``s = 2 * mean|x|`` (``[columns]``, detached, floored at ``1e-8``)."""
        with torch.no_grad():
            cols = self.to_columns(x.detach())
            return (2 * cols.abs().mean(0)).clamp(min=MIN_SCALE).float()

    def _record_scale(self, s: torch.Tensor) -> None:
        # outside inference mode so the buffer stays a normal tensor that training can update later
        with torch.inference_mode(False), torch.no_grad():
            if self.scale.shape == s.shape:
                self.scale.copy_(s)
            else:
                set_tensor(self, "scale", s.to(self.scale.device))
            self.calibrated.fill_(True)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        self._record_scale((2 * cols.abs().mean(0)).clamp(min=MIN_SCALE).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not self.observing and not bool(self.calibrated):
            self._record_scale(self.statistic(x))
        return super().forward(x)

    # codes -----------------------------------------------------------------------------------
    def _codes(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Rounded codes ``k`` (float, same shape as ``x``) for the broadcast scale ``s``."""
        n = self.half_levels
        c = torch.clamp(x.detach() / s, -1.0, CLIP_HI)
        return torch.round(c * n - 0.5)

    def _values(self, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s * (k + 0.5) / self.half_levels

    def integer_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-rounding value ``clamp(x / s, -1, 1 - 1e-6) * n - 0.5`` (shape of ``x``, integer-step units).

        Uses the statistic of ``x`` itself (detached); rounding it gives the codes. Oscillation trackers
        and OFQ's confidence-guided annealing read it.
        """
        s = self.expand(self.statistic(x).to(x.device), x)
        return torch.clamp(x / s, -1.0, CLIP_HI) * self.half_levels - 0.5

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s_cols = self.statistic(x).to(x.device)
        if self.training:
            self._record_scale(s_cols)
        s = self.expand(s_cols, x)
        out = self._values(self._codes(x, s), s).to(x.dtype)
        return straight_through(x, out)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``k`` in ``[-n, n-1]`` (``int32``); records the statistic of ``x`` in ``scale``."""
        s_cols = self.statistic(x).to(x.device)
        self._record_scale(s_cols)
        return self._codes(x, self.expand(s_cols, x)).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``scale * (codes + 0.5) / n`` with the stored ``scale``."""
        return self._values(codes.float(), self.expand(self.scale, codes))
