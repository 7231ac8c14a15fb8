"""SULQ: I&S-ViT's shift-uniform-log2 quantizer for post-softmax values."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._registry import register_quantizer
from .base import Quantizer, set_tensor
from .companding import check_nonnegative, unsigned_only
from .functional import round_ste

MODES = ("paper", "code")
RANGE_MINS = ("observed", "eta")
#: the reference code's η grid (``mode="code"``).
CODE_ETA_GRID: Tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
#: qvit's η grid for ``mode="paper"``: the code's grid plus smaller shifts (the paper does not give its grid).
PAPER_ETA_GRID: Tuple[float, ...] = (1e-5, 1e-4, 5e-4) + CODE_ETA_GRID
MIN_SPAN = 1e-4


@register_quantizer("sulq")
class SULQQuantizer(Quantizer):
    """Shift-Uniform-Log2 Quantizer (I&S-ViT): uniform quantization of ``log2(x + η)``.

    ``mode="paper"`` (qvit's default: I&S-ViT Eq. 13-14 read without rounding the exponent again; quantizing
    ``log2`` rather than the paper's ``-log2`` only mirrors the grid)::

        y    = log2(x + η)
        step = (maxv - minv) / (2^b - 1)
        k    = clamp(round((y - minv) / step), 0, 2^b - 1)            # the code, 2^b levels
        x̂    = 2^(k step + minv) - η

    ``mode="code"`` reproduces the reference implementation (``LogSqrt2Quantizer`` in I&S-ViT's code)::

        y    = ln(x + η) / ln 2
        step = (maxv - minv) / 2^b                                   # the search used (maxv - minv) / (2^b - 1)
        k    = clamp(round((y - minv) / step), 0, 2^b)               # 2^b + 1 levels (off by one)
        x̂    = 2^round(k step + minv) - η                            # exponent rounded: powers of two minus η

    Calibration (both modes) searches ``η`` over ``eta_grid`` per column: for each ``η``, ``maxv``/``minv`` are the
    observed max/min of ``y`` (``range_min="eta"``: ``minv = log2(η)``, so ``x = 0`` maps to the lowest level),
    the data are quantized with ``step = (maxv - minv) / (2^b - 1)`` (``code``: exponents rounded) and the ``η``
    with the lowest MSE is kept (first on ties). ``eta_grid=None`` takes :data:`CODE_ETA_GRID` in ``code`` mode and
    :data:`PAPER_ETA_GRID` in ``paper`` mode. ``η`` is an ``nn.Parameter`` (trainable only with ``learn_eta``);
    ``minv``/``maxv`` are buffers. Gradients: straight-through through the roundings in the log domain, as in the
    reference code, so ``dx̂/dx = (x̂ + η) / (x + η)`` strictly inside the range (``0 < (y - minv) / step < top``)
    and 0 outside it and on its bounds (the LSQ convention, independent of ``torch.clamp``'s bound gradient).

    Args:
        mode: ``"paper"`` or ``"code"``.
        eta_grid: candidate shifts ``η > 0``; ``None`` for the mode's default grid.
        learn_eta: make ``η`` trainable (``requires_grad``); PTQ keeps it frozen.
        range_min: ``"observed"`` (the reference) or ``"eta"`` (``minv = log2(η)``; ``paper`` mode only).
    """

    supported_inits = ("minmax",)

    def __init__(self, bits: int = 8, *, mode: str = "paper", eta_grid: Optional[Sequence[float]] = None,
                 learn_eta: bool = False, range_min: str = "observed", **kwargs: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"SULQ mode must be one of {MODES}, got {mode!r}")
        if range_min not in RANGE_MINS:
            raise ValueError(f"range_min must be one of {RANGE_MINS}, got {range_min!r}")
        if mode == "code" and range_min != "observed":
            raise ValueError("SULQ mode='code' reproduces the reference code, which uses range_min='observed'")
        if not isinstance(learn_eta, bool):
            raise ValueError(f"learn_eta must be a bool, got {learn_eta!r}")
        if eta_grid is not None:
            eta_grid = tuple(eta_grid)
            if not eta_grid or not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                       and math.isfinite(e) and e > 0 for e in eta_grid):
                raise ValueError(f"eta_grid must be a non-empty sequence of positive numbers, got {eta_grid!r}")
            eta_grid = tuple(float(e) for e in eta_grid)
        kwargs["signed"] = unsigned_only(type(self).__name__, kwargs.get("signed"))
        super().__init__(bits, **kwargs)
        self.mode = mode
        self.eta_grid = eta_grid
        self.learn_eta = learn_eta
        self.range_min = range_min
        self.eta = nn.Parameter(torch.full((1,), self.search_grid[0]), requires_grad=learn_eta)
        self.register_buffer("minv", torch.zeros(1))
        self.register_buffer("maxv", torch.ones(1))

    @property
    def search_grid(self) -> Tuple[float, ...]:
        """The ``η`` values calibration chooses from."""
        if self.eta_grid is not None:
            return self.eta_grid
        return CODE_ETA_GRID if self.mode == "code" else PAPER_ETA_GRID

    # codes ---------------------------------------------------------------------------------------
    @property
    def top_code(self) -> int:
        """Largest code: ``2^b - 1`` (paper) or ``2^b`` (code: ``2^b + 1`` levels)."""
        return (1 << self.bits) - (self.mode == "paper")

    def code_range(self) -> Tuple[int, int]:
        return 0, self.top_code

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"eta": self.eta, "span": self.maxv - self.minv}

    def _log2(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "code":
            return torch.log(x) / torch.log(torch.tensor(2.0, dtype=x.dtype, device=x.device))
        return torch.log2(x)

    def _params(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eta, minv, maxv = (self.expand(p, like) for p in (self.eta, self.minv, self.maxv))
        return eta, minv, (maxv - minv) / self.top_code

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        eta, minv, step = self._params(x)
        y = self._log2(x.float().clamp(min=0) + eta)
        return torch.clamp(torch.round((y - minv) / step), 0, self.top_code).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        eta, minv, step = self._params(codes)
        e = codes.float() * step + minv
        if self.mode == "code":
            e = torch.round(e)
        return torch.exp2(e) - eta

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        eta, minv, step = self._params(x)
        y = self._log2(x.float().clamp(min=0) + eta)
        v = (y - minv) / step
        inside = (v > 0) & (v < self.top_code)
        k = torch.where(inside, round_ste(v), torch.clamp(torch.round(v), 0, self.top_code).detach())
        e = k * step + minv
        if self.mode == "code":
            e = round_ste(e)
        return (torch.exp2(e) - eta).to(x.dtype)

    def levels(self) -> torch.Tensor:
        """Dequantized value of every code, ``[columns, top_code + 1]``."""
        codes = torch.arange(self.top_code + 1, device=self.minv.device).unsqueeze(1)
        eta, minv, maxv = self.eta.detach(), self.minv, self.maxv
        e = codes * ((maxv - minv) / self.top_code) + minv
        if self.mode == "code":
            e = torch.round(e)
        return (torch.exp2(e) - eta).t()

    # calibration ---------------------------------------------------------------------------------
    def search_error(self, cols: torch.Tensor, eta: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Calibration MSE of shift ``eta`` on ``cols`` ``[samples, columns]``: ``(mse, minv, maxv)``, ``[columns]``.

        Uses the search step ``(maxv - minv) / (2^b - 1)`` in both modes (``code``: exponents rounded).
        """
        y = self._log2(cols + eta)
        maxv = y.amax(0)
        if self.range_min == "eta":
            minv = self._log2(torch.full_like(maxv, eta))
        else:
            minv = y.amin(0)
        maxv = torch.maximum(maxv, minv + MIN_SPAN)
        top = (1 << self.bits) - 1
        step = (maxv - minv) / top
        k = torch.clamp(torch.round((y - minv) / step), 0, top)
        e = k * step + minv
        if self.mode == "code":
            e = torch.round(e)
        return (torch.exp2(e) - eta - cols).pow(2).mean(0), minv, maxv

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        check_nonnegative(self._name(), cols)
        cols = cols.float()
        best_err = torch.full((cols.shape[1],), math.inf, device=cols.device)
        best_eta, best_min, best_max = torch.zeros_like(best_err), torch.zeros_like(best_err), torch.ones_like(best_err)
        for eta in self.search_grid:
            err, minv, maxv = self.search_error(cols, eta)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_eta = torch.where(better, torch.full_like(err, eta), best_eta)
            best_min = torch.where(better, minv, best_min)
            best_max = torch.where(better, maxv, best_max)
        self.set_params(best_eta, best_min, best_max)

    def set_params(self, eta: torch.Tensor, minv: torch.Tensor, maxv: torch.Tensor) -> None:
        """Set per-column ``η``, ``minv`` and ``maxv`` (each ``[columns]``; log2 domain for the bounds)."""
        device = self.minv.device
        set_tensor(self, "eta", eta.detach().float().reshape(-1).to(device))
        set_tensor(self, "minv", minv.detach().float().reshape(-1).to(device))
        set_tensor(self, "maxv", maxv.detach().float().reshape(-1).to(device))

    def config(self) -> Dict[str, Any]:
        grid = None if self.eta_grid is None else list(self.eta_grid)
        return {**super().config(), "mode": self.mode, "eta_grid": grid, "learn_eta": self.learn_eta,
                "range_min": self.range_min}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"
