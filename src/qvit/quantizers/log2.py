"""Logarithmic post-softmax quantizers: ``log2`` (FQ-ViT) and ``log_sqrt2`` (RepQ-ViT)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Tuple

import torch

from ._registry import register_quantizer
from .base import MIN_SCALE, Quantizer, set_tensor
from .companding import check_nonnegative, unsigned_only
from .functional import straight_through
from .ranges import select_by_error

SQRT2 = math.sqrt(2.0)


@register_quantizer("log2")
class Log2Quantizer(Quantizer):
    """Power-of-two levels below a clipping value ``Δ``, plus an underflow zero (FQ-ViT's LIS quantizer).

    With ``m`` exponent steps per octave (1 here, 2 for :class:`LogSqrt2Quantizer`)::

        q  = round(-m * log2(x / Δ))              # x > 0
        q >= Z  or  x <= 0   ->  code Z,  x̂ = 0    # underflow to zero
        otherwise            ->  code clamp(q, 0, Z - 1),  x̂ = Δ * 2^(-q / m)

    ``Z = 2^b`` by default: the zero is an extra value beyond the ``2^b`` levels, so ``code_range()`` is
    ``(0, 2^b)`` and an integer export needs ``b + 1`` bits or a flag. ``reserve_zero=True`` gives up the
    smallest level instead: ``Z = 2^b - 1``, codes ``0..2^b - 1`` with ``2^b - 1`` meaning zero.

    ``Δ`` (one per column, a buffer) is the ``hi`` end of the ``init`` range estimator: ``minmax`` gives the
    maximum, ``percentile`` with ``percentile=(99.9, 99.99, 99.999)`` is RepQ-ViT's quantile search and
    ``mse`` shrinks the maximum; with several candidates the one with the lowest MSE is kept.
    Gradient: straight-through (identity) for ``0 < x < Δ``, zero elsewhere.

    Args:
        reserve_zero: represent the underflow zero by the last of the ``2^b`` codes instead of an extra code.
    """

    #: exponent steps per octave ``m``: the levels are ``Δ * 2^(-q / m)``.
    octave_steps: ClassVar[int] = 1

    def __init__(self, bits: int = 8, *, reserve_zero: bool = False, **kwargs: Any) -> None:
        if not isinstance(reserve_zero, bool):
            raise ValueError(f"reserve_zero must be a bool, got {reserve_zero!r}")
        kwargs["signed"] = unsigned_only(type(self).__name__, kwargs.get("signed"))
        super().__init__(bits, **kwargs)
        self.reserve_zero = reserve_zero
        self.register_buffer("delta", torch.ones(1))

    # codes ---------------------------------------------------------------------------------------
    @property
    def zero_code(self) -> int:
        """The code that means 0 (``2^b``, or ``2^b - 1`` with ``reserve_zero``)."""
        return (1 << self.bits) - int(self.reserve_zero)

    def code_range(self) -> Tuple[int, int]:
        return 0, self.zero_code

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        return {"delta": self.delta}

    def _codes(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        x = x.float()
        positive = x > 0
        ratio = torch.where(positive, x / delta, torch.ones_like(x))
        q = torch.round(-self.octave_steps * torch.log2(ratio))
        zc = self.zero_code
        underflow = ~positive | (q >= zc)
        return torch.where(underflow, torch.full_like(q, zc), q.clamp(0, zc - 1)).to(torch.int32)

    def _values(self, codes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        value = delta * torch.exp2(-codes.float() / self.octave_steps)
        return torch.where(codes >= self.zero_code, torch.zeros_like(value), value)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x, self.expand(self.delta, x))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes, self.expand(self.delta, codes))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.expand(self.delta, x)
        value = self._values(self._codes(x, delta), delta)
        return straight_through(x, value, (x > 0) & (x < delta))

    def shift_decomposition(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shift-and-multiply form of ``codes``: ``x̂ = nonzero * Δ * 2^(-shift) * (1 + (√2 - 1) * odd)``.

        For ``log2`` ``shift = q`` and ``odd = 0``. For ``log_sqrt2`` ``shift = ceil(q / 2)`` and
        ``odd = q mod 2`` (RepQ-ViT's log√2 -> log2 inference form: a bit shift, times √2 for odd codes).
        Returns ``(shift, odd, nonzero)``: two ``int32`` tensors and a bool tensor, shaped like ``codes``.
        """
        nonzero = codes < self.zero_code
        q = torch.where(nonzero, codes, torch.zeros_like(codes)).to(torch.int32)
        if self.octave_steps == 1:
            return q, torch.zeros_like(q), nonzero
        shift = torch.div(q + 1, 2, rounding_mode="floor")
        return shift, q - 2 * torch.div(q, 2, rounding_mode="floor"), nonzero

    def dequantize_shift(self, codes: torch.Tensor) -> torch.Tensor:
        """Dequantize through :meth:`shift_decomposition` (equals :meth:`dequantize` to float rounding)."""
        shift, odd, nonzero = self.shift_decomposition(codes)
        value = self.expand(self.delta, codes) * (1.0 + (SQRT2 - 1.0) * odd.float()) * torch.exp2(-shift.float())
        return torch.where(nonzero, value, torch.zeros_like(value))

    # calibration ---------------------------------------------------------------------------------
    def _error(self, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (self._values(self._codes(cols, hi), hi) - cols).pow(2).mean(0)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        check_nonnegative(self._name(), cols)
        lo, hi = self.candidate_ranges(cols)
        _, hi = select_by_error(cols, lo, hi.clamp(min=MIN_SCALE), self._error)
        self.set_params(hi)

    def set_params(self, delta: torch.Tensor) -> None:
        """Set the per-column clipping value ``Δ`` (``[columns]``) directly."""
        set_tensor(self, "delta", delta.detach().float().reshape(-1).to(self.delta.device))

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "reserve_zero": self.reserve_zero}

    def extra_repr(self) -> str:
        return super().extra_repr() + (", reserve_zero" if self.reserve_zero else "")


@register_quantizer("log_sqrt2")
class LogSqrt2Quantizer(Log2Quantizer):
    """RepQ-ViT's log√2 quantizer: two levels per octave, ``q = round(-2 log2(x / Δ))``, ``x̂ = Δ 2^(-q/2)``.

    Zero handling, ``reserve_zero`` and calibration are those of :class:`Log2Quantizer` (RepQ-ViT:
    ``init="percentile"``, ``percentile=(99.9, 99.99, 99.999)``). :meth:`shift_decomposition` gives the
    integer inference form ``x̂ = Δ * 2^(-ceil(q/2)) * (1 + (√2 - 1) * (q mod 2))``.
    """

    octave_steps = 2
