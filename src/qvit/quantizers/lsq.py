"""LSQ and LSQ+: uniform quantizers with a learnable step size (and offset)."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn

from ._registry import register_quantizer
from .functional import FakeQuantArgs, affine_fake_quant
from .base import MIN_SCALE, set_tensor
from .uniform import UniformQuantizer

GRAD_SCALES = ("lsq", "vvtq_weight", "vvtq_act", "none")
#: how LSQ+'s offset gradient is scaled: by the step size's factor ``g``, or not at all (VVTQ's code)
OFFSET_GRADS = ("scaled", "unscaled")
#: options of ``init="lsq"``: the factor of mean|x| in the initial step, for signed and for unsigned grids
LSQ_INIT_OPTIONS = ("factor", "unsigned_factor")


@register_quantizer("lsq")
class LSQQuantizer(UniformQuantizer):
    """Learned Step size Quantization (Esser et al. 2020): ``x̂ = clamp(round(x / s), Qn, Qp) * s``.

    ``s`` is an ``nn.Parameter``. Its gradient is LSQ's (``round(v) - v`` inside the range, the clipped
    level outside, ``v = x / s``) times the gradient scale ``g``:

    * ``lsq``: ``1 / sqrt(N * Qp)`` with ``N`` the elements per scale (Esser et al.);
    * ``vvtq_weight``: ``1 / sqrt(sum|x| * Qp)`` (VVTQ's magnitude-aware weight scaling);
    * ``vvtq_act``: ``1 / (sqrt(N) * Qp)`` (VVTQ's activation scaling);
    * ``none``: 1, or a float for a fixed factor.

    ``init="lsq"`` sets ``s = 2 * mean|x| / sqrt(Qp)`` (options ``factor``, the 2, and ``unsigned_factor``, the
    factor for an unsigned grid: OFQ's code uses 4); ``minmax``/``percentile``/``mse`` use ranges.
    """

    def __init__(self, bits: int = 8, *, init: str = "lsq", grad_scale: Union[str, float] = "lsq",
                 **kwargs) -> None:
        if type(self) is LSQQuantizer and not kwargs.get("symmetric", True):
            raise ValueError("LSQQuantizer has no zero-point or offset (symmetric=False is not supported); "
                             "use kind 'lsq_plus' for an asymmetric range with a learnable offset")
        if not isinstance(grad_scale, (int, float)) and grad_scale not in GRAD_SCALES:
            raise ValueError(f"grad_scale must be one of {GRAD_SCALES} or a number, got {grad_scale!r}")
        self.grad_scale = grad_scale
        super().__init__(bits, init=init, include_zero=kwargs.pop("include_zero", True), **kwargs)
        del self._buffers["scale"]
        self.scale = nn.Parameter(torch.ones(1))

    def _check_init_options(self, init, options):
        if init == "lsq":
            unknown = set(options) - set(LSQ_INIT_OPTIONS)
            if unknown:
                raise TypeError(f"{type(self).__name__}: unexpected options {sorted(unknown)} "
                                f"(init='lsq' accepts {list(LSQ_INIT_OPTIONS)})")
            for key, value in options.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"{type(self).__name__}: {key} must be a positive number, got {value!r}")
            return {k: float(v) for k, v in options.items()}
        return super()._check_init_options(init, options)

    def lsq_init_step(self, cols: torch.Tensor, qmax: int, unsigned: bool) -> torch.Tensor:
        """LSQ's initial step ``factor * mean|x| / sqrt(qmax)`` per column of ``cols`` ``[rows, columns]``, with
        ``factor`` (default 2, Esser et al.) or, for an unsigned grid, ``unsigned_factor`` (default ``factor``)."""
        factor = self.init_options.get("factor", 2.0)
        if unsigned:
            factor = self.init_options.get("unsigned_factor", factor)
        return (factor * cols.abs().mean(0) / math.sqrt(qmax)).clamp(min=MIN_SCALE)

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        if self.init != "lsq":
            return super()._init_from_columns(cols)
        qmin, qmax = self.code_range()
        scale = self.lsq_init_step(cols, qmax, unsigned=qmin == 0)
        self.set_params(scale, torch.zeros_like(scale))

    def grad_factor(self, x: torch.Tensor) -> Union[float, torch.Tensor]:
        """The factor ``g`` applied to the scale gradient for input ``x``."""
        if isinstance(self.grad_scale, (int, float)):
            return float(self.grad_scale)
        if self.grad_scale == "none":
            return 1.0
        qmax = self.code_range()[1]
        n = x.numel() / self.scale.numel()
        if self.grad_scale == "lsq":
            return 1.0 / math.sqrt(n * qmax)
        if self.grad_scale == "vvtq_act":
            return 1.0 / (math.sqrt(n) * qmax)
        l1 = x.detach().abs().sum() / self.scale.numel()
        return torch.rsqrt(l1 * qmax)

    def fake_quant_args(self, x: torch.Tensor) -> FakeQuantArgs:
        qmin, qmax = self.code_range()
        return FakeQuantArgs(self.expand(self.scale, x), None, qmin, qmax, scale_grad=self.grad_factor(x))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        return torch.clamp(torch.round(x / self.expand(self.scale, x)), qmin, qmax).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() * self.expand(self.scale, codes)

    def affine_form(self):
        return (self.scale.detach(), torch.zeros_like(self.scale), *self.code_range())

    def config(self):
        return {**super().config(), "grad_scale": self.grad_scale}


@register_quantizer("lsq_plus")
class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ (Bhalgat et al. 2020): a learnable offset ``beta`` as well as the step size.

    ``x̂ = clamp(round((x - beta) / s), Qn, Qp) * s + beta``. The offset gradient is ``1`` outside the
    range and ``0`` inside; ``offset_grad="scaled"`` multiplies it by the step size's factor ``g`` (a second
    quantizer parameter summing as many per-element terms as the step), ``"unscaled"`` leaves it as it is
    (VVTQ's ``QuantAct``, whose offset is added outside the gradient-scaled step). Initialised from a range
    (default ``minmax``): ``s = (hi - lo) / (Qp - Qn)`` and ``beta = lo - Qn * s``; or with ``init="lsq"`` as
    LSQ would quantize the data (the factor 2 set by ``factor`` and ``unsigned_factor`` as for LSQ): unsigned
    data ``s = 2 * mean|x| / sqrt(2^b - 1)``, ``beta = 0``; signed data
    (``signed`` set, or negative values observed) the grid centred on zero as in signed LSQ,
    ``s = 2 * mean|x| / sqrt(2^(b-1) - 1)``, ``beta = -2^(b-1) * s`` (codes ``0 .. 2^b - 1`` stand for
    ``-2^(b-1) .. 2^(b-1) - 1`` steps).
    """

    def __init__(self, bits: int = 8, *, init: str = "minmax", offset_grad: str = "scaled", **kwargs) -> None:
        if offset_grad not in OFFSET_GRADS:
            raise ValueError(f"offset_grad must be one of {OFFSET_GRADS}, got {offset_grad!r}")
        self.offset_grad = offset_grad
        super().__init__(bits, init=init, **kwargs)
        self.offset = nn.Parameter(torch.zeros(1))

    def _init_from_columns(self, cols: torch.Tensor) -> None:
        qmin, qmax = self.code_range()
        if self.init == "lsq":
            half = 1 << (self.bits - 1)
            if self.signed and qmin == 0:   # signed data on codes 0 .. 2^b - 1: read them as -2^(b-1) .. 2^(b-1) - 1
                scale = self.lsq_init_step(cols, half - 1, unsigned=False)
                offset = -half * scale
            else:
                scale = self.lsq_init_step(cols, qmax, unsigned=qmin == 0)
                offset = torch.zeros_like(scale)
            self.set_params(scale, torch.zeros_like(scale))
            set_tensor(self, "offset", offset)
            return
        from .ranges import select_by_error
        lo, hi = select_by_error(cols, *self.candidate_ranges(cols), self._error_offset)
        scale, offset = self._range_to_scale_offset(lo, hi)
        self.set_params(scale, torch.zeros_like(scale))
        set_tensor(self, "offset", offset.to(self.scale.device))

    def _range_to_scale_offset(self, lo: torch.Tensor, hi: torch.Tensor):
        qmin, qmax = self.code_range()
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
        return scale, lo - qmin * scale

    def _error_offset(self, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        scale, offset = self._range_to_scale_offset(lo, hi)
        return (affine_fake_quant(cols, scale, offset, qmin, qmax) - cols).pow(2).mean(0)

    def fake_quant_args(self, x: torch.Tensor) -> FakeQuantArgs:
        qmin, qmax = self.code_range()
        g = self.grad_factor(x)
        return FakeQuantArgs(self.expand(self.scale, x), self.expand(self.offset, x), qmin, qmax, scale_grad=g,
                             offset_grad=g if self.offset_grad == "scaled" else 1.0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        v = (x - self.expand(self.offset, x)) / self.expand(self.scale, x)
        return torch.clamp(torch.round(v), qmin, qmax).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() * self.expand(self.scale, codes) + self.expand(self.offset, codes)

    def affine_form(self):
        return None   # the learnt offset is not a multiple of the step

    def config(self):
        return {**super().config(), "offset_grad": self.offset_grad}

    def integer_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-rounding position ``(x - beta) / s``."""
        return (x - self.expand(self.offset, x)) / self.expand(self.scale, x)
