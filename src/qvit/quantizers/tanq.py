"""TanQ: tangent companding quantizer for post-softmax values (DopQ-ViT), as read by qvit."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from .companding import check_nonnegative, unsigned_only
from .functional import straight_through

#: default search grid for ``α`` (per column, by MSE on the calibration data).
ALPHA_GRID: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def _half_angle(alpha: torch.Tensor) -> torch.Tensor:
    return alpha * (math.pi / 2)


def tan_compress(x: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``u = g(x) = 1/2 + tan(θ (2 x / s - 1)) / (2 tan θ)`` with ``θ = α π / 2``; ``x`` is clipped to ``[0, s]``.

    ``alpha`` and ``scale`` broadcast against ``x``; ``u`` lies in ``[0, 1]`` with ``g(0) = 0`` and ``g(s) = 1``.
    """
    theta = _half_angle(alpha)
    t = torch.minimum(x.clamp(min=0), scale) / scale
    return 0.5 + torch.tan(theta * (2 * t - 1)) / (2 * torch.tan(theta))


def tan_expand(u: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x = g⁻¹(u) = s (1/2 + atan((2 u - 1) tan θ) / (2 θ))`` with ``θ = α π / 2``, for ``u`` in ``[0, 1]``.

    ``θ`` is evaluated as ``atan(tan θ)`` so that ``u = 0`` and ``u = 1`` map exactly to ``0`` and ``s``.
    """
    tan_theta = torch.tan(_half_angle(alpha))
    return scale * (0.5 + torch.atan((2 * u - 1) * tan_theta) / (2 * torch.atan(tan_theta)))


@register_quantizer("tanq")
class TanQQuantizer(Quantizer):
    """TanQ, qvit's reading of DopQ-ViT's tangent quantizer (no public code; the method section was not read).

    A symmetric tangent compander on ``[0, s]`` followed by a uniform ``b``-bit grid in the companded domain::

        θ   = α π / 2,  α in (0, 1)
        u   = g(x) = 1/2 + tan(θ (2 x / s - 1)) / (2 tan θ)       # = 1/2 + tan(απ (x/s - 1/2)) / (2 tan(απ/2))
        k   = clamp(round(u (2^b - 1)), 0, 2^b - 1)                # the code
        x̂   = s g⁻¹(k / (2^b - 1)),  g⁻¹(u) = 1/2 + atan((2 u - 1) tan θ) / (α π)

    ``g`` is steepest at both ends, so the ``2^b`` levels crowd near ``0`` *and* near ``s`` (DopQ-ViT's aim:
    resolution for the rare large attention probabilities as well as the many small ones); ``α -> 0`` is the
    uniform grid and larger ``α`` crowds the ends more. The grid is symmetric about ``s / 2`` and has no level
    there, so ``2^(b-1)`` levels lie in ``[s/2, s]`` for every ``α``: with ``s = 1`` that is more than log2's
    two levels in ``[0.5, 1]`` from 3 bits up, equal at 2 bits. ``0`` and ``s`` are levels.

    ``α`` (a buffer, one per column) is searched by MSE on the calibration data over ``alpha_grid``
    (default :data:`ALPHA_GRID` = 0.05, 0.1, 0.2, ..., 0.8, 0.85, 0.9, 0.95, 0.98) unless ``alpha`` fixes it.
    ``s`` is ``1`` by default (softmax outputs lie in ``[0, 1]``); ``scale=None`` calibrates it from the ``hi``
    end of the ``init`` range estimator, searched jointly with ``α``. Gradient: straight-through (identity) for
    ``0 < x < s``, zero elsewhere.

    Args:
        alpha: fixed ``α`` in ``(0, 1)`` (no search), or ``None`` to search ``alpha_grid``.
        alpha_grid: candidate ``α`` values, each in ``(0, 1)``.
        scale: fixed ``s > 0``, or ``None`` to calibrate ``s`` from the range estimator.
    """

    def __init__(self, bits: int = 8, *, alpha: Optional[float] = None, alpha_grid: Sequence[float] = ALPHA_GRID,
                 scale: Optional[float] = 1.0, **kwargs: Any) -> None:
        if not len(alpha_grid):
            raise ValueError("alpha_grid must not be empty")
        grid = (alpha,) if alpha is not None else tuple(alpha_grid)
        for a in tuple(alpha_grid) + grid:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
                raise ValueError(f"TanQ alpha must be a number in (0, 1) (0 is uniform, 1 singular), got {a!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale must be a positive number or None (calibrate), got {scale!r}")
        kwargs["signed"] = unsigned_only(type(self).__name__, kwargs.get("signed"))
        super().__init__(bits, **kwargs)
        self.alpha_value = None if alpha is None else float(alpha)
        self.alpha_grid = tuple(float(a) for a in alpha_grid)
        self.fixed_scale = None if scale is None else float(scale)
        self.register_buffer("alpha", torch.full((1,), grid[0], dtype=torch.float32))
        self.register_buffer("scale", torch.full((1,), 1.0 if scale is None else float(scale)))

    @property
    def search_grid(self) -> Tuple[float, ...]:
        """The ``α`` values calibration chooses from."""
        return (self.alpha_value,) if self.alpha_value is not None else self.alpha_grid

    # codes ---------------------------------------------------------------------------------------
    def code_range(self) -> Tuple[int, int]:
        return 0, (1 << self.bits) - 1

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"scale": self.scale, "alpha": self.alpha}

    def check_params(self) -> None:
        super().check_params()
        if bool((self.alpha >= 1).any()):
            raise ValueError(f"{self._name()}: alpha must be < 1, got {self.alpha.flatten()[:4].tolist()}")

    def _codes(self, x: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        top = (1 << self.bits) - 1
        u = tan_compress(x.float(), alpha, scale)
        return torch.clamp(torch.round(u * top), 0, top).to(torch.int32)

    def _values(self, codes: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return tan_expand(codes.float() / ((1 << self.bits) - 1), alpha, scale)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x, self.expand(self.alpha, x), self.expand(self.scale, x))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes, self.expand(self.alpha, codes), self.expand(self.scale, codes))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        alpha, scale = self.expand(self.alpha, x), self.expand(self.scale, x)
        value = self._values(self._codes(x, alpha, scale), alpha, scale)
        return straight_through(x, value, (x > 0) & (x < scale))

    def levels(self) -> torch.Tensor:
        """All dequantized levels, ``[columns, 2^b]`` (ascending)."""
        codes = torch.arange(1 << self.bits, device=self.alpha.device).unsqueeze(0)
        return self._values(codes, self.alpha.unsqueeze(1), self.scale.unsqueeze(1))

    # calibration ---------------------------------------------------------------------------------
    def _error(self, cols: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (self._values(self._codes(cols, alpha, scale), alpha, scale) - cols).pow(2).mean(0)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        check_nonnegative(self._name(), cols)
        cols = cols.float()
        if self.fixed_scale is None:
            scales = self.candidate_ranges(cols)[1].clamp(min=MIN_SCALE)
        else:
            scales = torch.full((1, cols.shape[1]), self.fixed_scale, device=cols.device)
        best_err = torch.full((cols.shape[1],), math.inf, device=cols.device)
        best_alpha = torch.zeros_like(best_err)
        best_scale = torch.zeros_like(best_err)
        for scale in scales:
            for a in self.search_grid:
                alpha = torch.full_like(scale, a)
                err = self._error(cols, alpha, scale)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_alpha = torch.where(better, alpha, best_alpha)
                best_scale = torch.where(better, scale, best_scale)
        self.set_params(best_alpha, best_scale)

    def set_params(self, alpha: torch.Tensor, scale: torch.Tensor) -> None:
        """Set per-column ``α`` and ``s`` (both ``[columns]``) directly."""
        set_tensor(self, "alpha", alpha.detach().float().reshape(-1).to(self.alpha.device))
        set_tensor(self, "scale", scale.detach().float().reshape(-1).to(self.scale.device))

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "alpha": self.alpha_value, "alpha_grid": list(self.alpha_grid),
                "scale": self.fixed_scale}
