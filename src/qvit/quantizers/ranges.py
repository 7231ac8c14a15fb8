"""Range estimators: calibration data -> candidate clipping ranges, one per column.

Each estimator maps ``cols`` ``[samples, columns]`` to candidate ranges ``(lo, hi)``, both
``[candidates, columns]``. ``extremes`` are the exact per-column minimum and maximum of everything observed
(``cols`` may be a subsample). With several candidates the quantizer keeps, per column, the one whose
fake quantization of ``cols`` has the lowest mean squared error.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..registry import Registry

Ranges = Tuple[torch.Tensor, torch.Tensor]
RangeEstimator = Callable[..., Ranges]
RANGES: Registry[str, RangeEstimator] = Registry("range estimator (init)")


def register_range(name: str) -> Callable[[RangeEstimator], RangeEstimator]:
    """Decorator: make ``fn(cols, ...) -> (lo, hi)`` a quantizer ``init`` named ``name``."""
    return RANGES.register(name)


def list_ranges() -> List[str]:
    """The registered range estimators, sorted."""
    return RANGES.names()


def get_range(name: str) -> RangeEstimator:
    """The range estimator registered as ``name``."""
    return RANGES.get(name)


@register_range("minmax")
def minmax_range(cols: torch.Tensor, extremes: Optional[Ranges] = None) -> Ranges:
    """The observed minimum and maximum of each column (one candidate)."""
    if extremes is not None:
        return extremes[0].reshape(1, -1), extremes[1].reshape(1, -1)
    return cols.amin(0, keepdim=True), cols.amax(0, keepdim=True)


def _quantile(cols: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-column quantiles ``[len(q), columns]`` (linear interpolation, like ``torch.quantile``)."""
    s, _ = torch.sort(cols, dim=0)
    pos = q.to(cols) * (s.shape[0] - 1)
    lo_i = pos.floor().long().clamp(0, s.shape[0] - 1)
    hi_i = (lo_i + 1).clamp(max=s.shape[0] - 1)
    frac = (pos - lo_i.to(pos)).unsqueeze(1)
    return s[lo_i] * (1 - frac) + s[hi_i] * frac


@register_range("percentile")
def percentile_range(cols: torch.Tensor, extremes: Optional[Ranges] = None,
                     percentile: Union[float, Sequence[float]] = (99.9, 99.99, 99.999)) -> Ranges:
    """Clip at the ``p``-th and ``(100 - p)``-th percentiles; several ``p`` are searched by MSE (RepQ-ViT)."""
    ps = torch.tensor([percentile] if isinstance(percentile, (int, float)) else list(percentile), dtype=torch.float64)
    if ((ps <= 50) | (ps > 100)).any():
        raise ValueError(f"percentile must be in (50, 100], got {ps.tolist()}")
    hi = _quantile(cols, ps / 100)
    lo = _quantile(cols, 1 - ps / 100)
    return lo, hi


@register_range("mse")
def mse_range(cols: torch.Tensor, extremes: Optional[Ranges] = None, num_candidates: int = 100,
              min_ratio: float = 0.05, margin: float = 0.0, absmax: bool = False) -> Ranges:
    """Shrink the min-max range by ``num_candidates`` ratios in ``[min_ratio, 1]``, searched by MSE.

    ``absmax=True`` shrinks the symmetric range ``±max|x|`` instead (``[0, max x]`` for a column with no
    negative value), and ``margin`` (in the data's units) widens the range before it is shrunk: each side that is
    not at zero moves out by ``margin``. Nagel et al.'s estimator is ``min_ratio=0.01, margin=0.5, absmax=True``:
    it searches ``k/100`` of ``max|x| + 0.5`` for ``k = 1..100``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    lo, hi = minmax_range(cols, extremes)
    if absmax:
        top = torch.maximum(lo.abs(), hi.abs())
        lo, hi = torch.where(lo < 0, -top, torch.zeros_like(lo)), top
    if margin:
        lo = torch.where(lo < 0, lo - margin, lo)
        hi = torch.where(hi > 0, hi + margin, hi)
    ratios = torch.linspace(min_ratio, 1.0, num_candidates, device=cols.device, dtype=cols.dtype).unsqueeze(1)
    return lo * ratios, hi * ratios


def select_by_error(cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    error: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Ranges:
    """Per column, the candidate range with the lowest ``error(cols, lo_k, hi_k)`` (a ``[columns]`` tensor)."""
    if lo.shape[0] == 1:
        return lo[0], hi[0]
    errs = torch.stack([error(cols, lo[k], hi[k]) for k in range(lo.shape[0])])
    best = errs.argmin(0, keepdim=True)
    return lo.gather(0, best)[0], hi.gather(0, best)[0]
