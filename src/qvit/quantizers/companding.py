"""Helpers shared by the post-softmax (companding / logarithmic) quantizer families."""
from __future__ import annotations

from typing import Optional

import torch


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value`` exactly. Backward: the gradient reaches ``x`` where ``inside`` is true."""

    @staticmethod
    def forward(ctx, x, value, inside):
        ctx.save_for_backward(inside)
        return value

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        grad_x = grad * inside.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def straight_through(x: torch.Tensor, value: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Return ``value`` (bit-exact) with the straight-through gradient ``d out / d x = inside``.

    Args:
        x: the input that was quantized, any shape.
        value: its quantize-dequantize result, same shape as ``x``.
        inside: bool mask, same shape: where ``x`` lies strictly inside the quantizer's range.
    """
    return _StraightThrough.apply(x, value.detach().to(x.dtype), inside.detach())


def unsigned_only(name: str, signed: Optional[bool]) -> bool:
    """Post-softmax quantizers are unsigned: return ``False`` or raise for ``signed=True``."""
    if signed:
        raise ValueError(f"{name} quantizes non-negative (post-softmax) inputs: signed must be False or None, "
                         f"got {signed!r}")
    return False


def check_nonnegative(name: str, cols: torch.Tensor) -> None:
    """Raise ``ValueError`` if calibration data ``cols`` holds negative values."""
    if bool((cols < 0).any()):
        raise ValueError(f"{name} expects non-negative (post-softmax) inputs; calibration data has minimum "
                         f"{float(cols.min()):.4g}")
