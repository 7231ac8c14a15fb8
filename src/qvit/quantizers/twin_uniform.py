"""Twin uniform quantizer (PTQ4ViT, Yuan et al. 2022) for post-Softmax and post-GELU activations."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from .functional import straight_through

MODES = ("softmax", "gelu")
GELU_MIN = 0.16997124254703522      # -min GELU(x): the negative range of post-GELU values
# linear search grid for the post-GELU positive step (PTQ4ViT's eq_alpha, eq_beta)
LINEAR_ALPHA, LINEAR_BETA = 0.01, 1.2


@register_quantizer("twin_uniform")
class TwinUniformQuantizer(Quantizer):
    """Twin uniform quantization: two uniform ranges share ``k`` bits (1 range bit + ``k-1`` value bits).

    With ``N = 2^(k-1)`` values per range, a value lies on ``R1`` (step ``Δ1``) or ``R2`` (step ``Δ2``),
    and the code is ``flag * N + index`` (flag 0: R1, 1: R2), in ``[0, 2^k - 1]``. Per column (``tensor``,
    ``channel`` or ``group`` granularity; PTQ4ViT's head-wise parameters are ``group`` along the head axis):

    * ``mode="softmax"`` (values in ``[0, 1]``; the paper's form): ``Δ2 = 1/N`` is fixed, ``Δ1 = Δ2 / 2^m``.
      ``R1 = [0, N·Δ1) = [0, 2^-m)`` with levels ``j·Δ1`` and ``R2`` levels ``i·Δ2``, ``i, j ∈ 0..N-1``
      (so the largest level is ``1 - 1/N``). ``x`` goes to R1 if ``x < 2^-m``, else to R2; indices are
      ``clamp(round(x/Δ), 0, N-1)``.
    * ``mode="gelu"``: ``R1`` holds the negatives ``-N·Δ1, ..., -Δ1`` with the fixed ``Δ1 = 0.16997/N`` (R1
      covers ``[-0.17, 0]``, GELU's negative range), R2 the levels ``0, Δ2, ..., (N-1)·Δ2``. ``x`` goes to R1
      when ``round(x/Δ1) < 0`` (values in ``[-Δ1/2, 0)`` round to R2's zero); R1 code ``round(x/Δ1) + N``
      clamped to ``[0, N-1]``. ``Δ2 = 2^m·Δ1`` (``pow2_ratio=True``, the paper's power-of-two constraint) or,
      with ``pow2_ratio=False`` (the released code), ``Δ2`` free on the linear grid
      ``Δ0·(α + i(β-α)/num_candidates)``, ``i = 0..num_candidates``, ``Δ0 = max(x)/(N - 0.5)``, ``α = 0.01``,
      ``β = 1.2``.

    Calibration (``init="mse"``, the only one) searches ``m ∈ 0..max_shift`` (or the linear grid) per column
    for the lowest mean squared error on the calibration data (ties: the smallest ``m``).
    Gradient: straight-through (1) for ``x`` in ``[x_lo, (N-1)·Δ2]`` with ``x_lo = 0`` (softmax) or
    ``-N·Δ1`` (gelu), 0 outside.

    ``replicate_code_offset=True`` (softmax only) reproduces the released PTQ4ViT code instead of the paper:
    ``split = 2^-m``, ``Δ2 = 1/(N-1)``, ``Δ1 = split/(N-1)`` and
    ``x̂ = round(clamp(x, split, 1)/Δ2)·Δ2 + round(clamp(x, 0, split)/Δ1)·Δ1``, so every ``x >= split``
    gains ``+split`` and ``x < split`` gains ``round(split·(N-1))·Δ2`` (0 when ``split·(N-1) < 0.5``).
    Codes keep the ``flag * N + index`` layout (R1 levels ``offset1 + j·Δ1``, R2 levels ``offset2 + i·Δ2``).

    ``symmetric`` is ignored; ``signed`` defaults to ``mode == "gelu"`` (metadata only: codes are unsigned).
    """

    supported_inits = ("mse",)

    def __init__(self, bits: int = 8, *, mode: str = "softmax", max_shift: int = 20, pow2_ratio: bool = True,
                 replicate_code_offset: bool = False, num_candidates: int = 100, init: str = "mse",
                 signed: Optional[bool] = None, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"TwinUniformQuantizer: mode must be one of {MODES}, got {mode!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift <= 60:
            raise ValueError(f"TwinUniformQuantizer: max_shift must be an integer in [0, 60], got {max_shift!r}")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"TwinUniformQuantizer: num_candidates must be a positive integer, got {num_candidates!r}")
        if mode == "softmax" and not pow2_ratio:
            raise ValueError("TwinUniformQuantizer: pow2_ratio=False applies to mode='gelu' only "
                             "(the softmax steps always have a power-of-two ratio)")
        if mode == "gelu" and replicate_code_offset:
            raise ValueError("TwinUniformQuantizer: replicate_code_offset applies to mode='softmax' only")
        if signed is not None and bool(signed) != (mode == "gelu"):
            raise ValueError(f"TwinUniformQuantizer: mode={mode!r} is {'signed' if mode == 'gelu' else 'unsigned'}, "
                             f"got signed={signed!r}")
        super().__init__(bits, init=init, signed=(mode == "gelu"), **kwargs)
        self.mode = mode
        self.max_shift = max_shift
        self.pow2_ratio = bool(pow2_ratio)
        self.replicate_code_offset = bool(replicate_code_offset)
        self.num_candidates = num_candidates
        for name in ("delta1", "delta2", "offset1", "offset2", "split"):
            self.register_buffer(name, torch.zeros(1))
        with torch.no_grad():
            self._set(self._shift_params(torch.zeros(1)))

    def _check_init_options(self, init: str, options: Dict[str, Any]) -> Dict[str, Any]:
        if options:
            raise TypeError(f"{type(self).__name__}: unexpected options {sorted(options)}")
        return {}

    @property
    def levels_per_range(self) -> int:
        """``N = 2^(k-1)``: values per range."""
        return 1 << (self.bits - 1)

    @property
    def shift(self) -> torch.Tensor:
        """``log2(Δ2 / Δ1)`` per column (the integer ``m`` unless ``pow2_ratio=False``)."""
        return torch.log2(self.delta2 / self.delta1)

    def code_range(self) -> Tuple[int, int]:
        return 0, 2 * self.levels_per_range - 1

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        out = {"delta1": self.delta1, "delta2": self.delta2}
        if self.mode == "softmax":
            out["split"] = self.split
        return out

    # parameters ------------------------------------------------------------------------------
    def _shift_params(self, m: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-column parameters for shifts ``m`` (float tensor of integers, ``[columns]``)."""
        n = self.levels_per_range
        m = m.float()
        zero = torch.zeros_like(m)
        if self.mode == "gelu":
            d1 = torch.full_like(m, GELU_MIN / n)
            return dict(delta1=d1, delta2=d1 * torch.exp2(m), offset1=zero, offset2=zero, split=zero)
        split = torch.exp2(-m)
        if not self.replicate_code_offset:
            d2 = torch.full_like(m, 1.0 / n)
            return dict(delta1=d2 * split, delta2=d2, offset1=zero, offset2=zero, split=split)
        d2 = torch.full_like(m, 1.0 / (n - 1))
        d1 = split / (n - 1)
        return dict(delta1=d1, delta2=d2, offset1=torch.round(split / d2) * d2,
                    offset2=torch.round(split / d1) * d1, split=split)

    def _set(self, params: Dict[str, torch.Tensor]) -> None:
        for name, value in params.items():
            set_tensor(self, name, value.detach().float().reshape(-1).to(self.delta1.device))

    def set_shift(self, shift: Union[int, torch.Tensor]) -> None:
        """Fix ``m`` (an int, or ``[columns]`` integers): ``Δ2 / Δ1 = 2^m``; marks the quantizer calibrated."""
        if self.mode == "gelu" and not self.pow2_ratio:
            raise ValueError("TwinUniformQuantizer: set_shift needs a power-of-two ratio; use set_delta2")
        m = torch.as_tensor(shift, dtype=torch.float32).reshape(-1)
        if (m != torch.round(m)).any():
            raise ValueError(f"TwinUniformQuantizer: shift must be integer-valued, got {m.tolist()}")
        self._set(self._shift_params(m))
        self.calibrated.fill_(True)
        self.check_params()

    def set_delta2(self, delta2: Union[float, torch.Tensor]) -> None:
        """Fix the post-GELU positive step ``Δ2`` (a float or ``[columns]``); marks the quantizer calibrated."""
        if self.mode != "gelu":
            raise ValueError("TwinUniformQuantizer: set_delta2 applies to mode='gelu' only; use set_shift")
        d2 = torch.as_tensor(delta2, dtype=torch.float32).reshape(-1)
        params = self._shift_params(torch.zeros_like(d2))
        params["delta2"] = d2
        self._set(params)
        self.calibrated.fill_(True)
        self.check_params()

    # grid ------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Range flag (bool, True = R2) and value index (float, ``[0, N-1]``) for broadcast parameters ``p``."""
        n = self.levels_per_range
        x = x.detach()
        if self.mode == "softmax":
            flag = x >= p["split"]
            if self.replicate_code_offset:
                i1 = torch.round(torch.minimum(x.clamp(min=0), p["split"]) / p["delta1"])
                i2 = torch.round(torch.maximum(x, p["split"]).clamp(max=1.0) / p["delta2"])
            else:
                i1 = torch.round(x / p["delta1"])
                i2 = torch.round(x / p["delta2"])
        else:
            q = torch.round(x / p["delta1"])
            flag = q >= 0
            i1 = q + n
            i2 = torch.round(x / p["delta2"])
        return flag, torch.where(flag, i2, i1).clamp(0, n - 1)

    def _decode(self, flag: torch.Tensor, idx: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        r1_index = idx - self.levels_per_range if self.mode == "gelu" else idx
        r1 = r1_index * p["delta1"] + p["offset1"]
        r2 = idx * p["delta2"] + p["offset2"]
        return torch.where(flag, r2, r1)

    def _bounds(self, p: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        hi = (self.levels_per_range - 1) * p["delta2"]
        lo = -self.levels_per_range * p["delta1"] if self.mode == "gelu" else torch.zeros_like(hi)
        return lo, hi

    def _expanded(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: self.expand(getattr(self, name), x)
                for name in ("delta1", "delta2", "offset1", "offset2", "split")}

    # calibration -----------------------------------------------------------------------------
    def candidate_params(self, cols: torch.Tensor) -> Iterator[Dict[str, torch.Tensor]]:
        """The grids calibration chooses from for columns ``cols`` ``[samples, columns]``: each a dict of the
        quantizer's buffers (``delta1``, ``delta2``, ``offset1``, ``offset2``, ``split``), per column ``[columns]``;
        power-of-two ratios ``Δ2/Δ1 = 2^m`` for ``m = 0..max_shift``, or (post-GELU, linear ratio) ``Δ2`` on a
        linear grid of ``num_candidates + 1`` multiples of the max-based step."""
        if self.mode == "gelu" and not self.pow2_ratio:
            n = self.levels_per_range
            d0 = cols.clamp(min=0).amax(0).clamp(min=MIN_SCALE) / (n - 0.5)
            base = self._shift_params(torch.zeros_like(d0))
            for i in range(self.num_candidates + 1):
                ratio = LINEAR_ALPHA + i * (LINEAR_BETA - LINEAR_ALPHA) / self.num_candidates
                yield {**base, "delta2": d0 * ratio}
        else:
            for m in range(self.max_shift + 1):
                yield self._shift_params(torch.full((cols.shape[1],), float(m), device=cols.device))

    def fit_columns(self, cols: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Of :meth:`candidate_params`, per column the one with the least squared error on ``cols``; the quantizer
        is not changed."""
        best_err, best = None, None
        for params in self.candidate_params(cols):
            params = {k: v.to(cols.device) for k, v in params.items()}
            err = (self._decode(*self._encode(cols, params), params) - cols).pow(2).mean(0)
            if best is None:
                best_err, best = err, params
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, params[k], best[k]) for k in best}
        return best

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        self._set(self.fit_columns(cols))

    # forward / codes -------------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        p = self._expanded(x)
        out = self._decode(*self._encode(x, p), p).to(x.dtype)
        lo, hi = self._bounds(p)
        xd = x.detach()
        inside = (xd >= lo) & (xd <= hi)
        return straight_through(x, out, inside)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        flag, idx = self._encode(x, self._expanded(x))
        return (flag.to(idx.dtype) * self.levels_per_range + idx).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        n = self.levels_per_range
        flag = codes >= n
        idx = (codes - flag.to(codes.dtype) * n).float()
        return self._decode(flag, idx, self._expanded(codes))

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "mode": self.mode, "max_shift": self.max_shift, "pow2_ratio": self.pow2_ratio,
                "replicate_code_offset": self.replicate_code_offset, "num_candidates": self.num_candidates}
