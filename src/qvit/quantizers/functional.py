"""The reference math of uniform fake quantization and the straight-through estimators (plain, eager PyTorch).

Faster kernels for the same arithmetic live in :mod:`qvit.kernels`; quantizers reach them through
:func:`qvit.backend.get_backend`, never directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

Bound = Union[float, torch.Tensor]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def sum_to(grad: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sum ``grad`` over the dimensions that were broadcast from ``shape``."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    out = grad.sum(dim=dims, keepdim=True) if dims else grad
    return out.reshape(shape)


class _AffineFakeQuant(torch.autograd.Function):
    """x̂ = clamp(round((x - offset) / scale), qmin, qmax) * scale + offset, with LSQ/LSQ+ gradients.

    Gradients (v = (x - offset) / scale, inside = qmin < v < qmax, bounds excluded as in Esser et al.):
    dx̂/dx = inside; dx̂/dscale = round(v) - v inside, the clipped level outside; dx̂/doffset = 1 - inside.
    The scale and offset gradients are multiplied by ``scale_grad`` and ``offset_grad`` (LSQ's g).
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, scale_grad, offset_grad):
        v = (x - offset) / scale if offset is not None else x / scale
        q = torch.clamp(torch.round(v), qmin, qmax)
        out = q * scale
        if offset is not None:
            out = out + offset
        ctx.save_for_backward(x, scale, offset if offset is not None else torch.empty(0),
                              qmin if torch.is_tensor(qmin) else torch.tensor(float(qmin)),
                              qmax if torch.is_tensor(qmax) else torch.tensor(float(qmax)))
        ctx.has_offset = offset is not None
        ctx.scale_grad, ctx.offset_grad = scale_grad, offset_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset, qmin, qmax = ctx.saved_tensors
        v = (x - offset) / scale if ctx.has_offset else x / scale
        q = torch.clamp(torch.round(v), qmin, qmax)
        need_offset = ctx.has_offset and ctx.needs_input_grad[2]
        grad_x, grad_scale_, grad_offset = affine_grads(
            grad, v, q, qmin, qmax, scale.shape, offset.shape if need_offset else None,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_offset)
        if grad_scale_ is not None:
            grad_scale_ = grad_scale_ * ctx.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * ctx.offset_grad
        return grad_x, grad_scale_, grad_offset, None, None, None, None


def affine_grads(grad, v, q, qmin: Bound, qmax: Bound, scale_shape: Sequence[int],
                 offset_shape: Optional[Sequence[int]], need_x: bool, need_scale: bool, need_offset: bool):
    """Input, scale and offset gradients of fake quantization (before LSQ's gradient factors) from the output
    gradient ``grad``, ``v = (x - offset) / scale`` and ``q = clamp(round(v), qmin, qmax)``."""
    inside = (v > qmin) & (v < qmax)
    grad_x = torch.where(inside, grad, 0.0) if need_x else None
    grad_scale = sum_to(grad * torch.where(inside, q - v, q), scale_shape) if need_scale else None
    grad_offset = sum_to(torch.where(inside, 0.0, grad), offset_shape) if need_offset else None
    return grad_x, grad_scale, grad_offset


def affine_fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor], qmin: Bound,
                      qmax: Bound, scale_grad: float = 1.0, offset_grad: float = 1.0) -> torch.Tensor:
    """Uniform fake quantization ``clamp(round((x - offset)/scale), qmin, qmax) * scale + offset``.

    ``scale``, ``offset``, ``qmin`` and ``qmax`` broadcast against ``x``. The input gradient is the
    straight-through estimate inside the range and zero outside; the scale/offset gradients are LSQ's
    (times ``scale_grad``/``offset_grad``). Without gradients it runs in place on one new tensor.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or
                                              (offset is not None and offset.requires_grad))
    if not needs_grad:
        v = x - offset if offset is not None else x
        out = torch.div(v, scale).round_().clamp_(qmin, qmax).mul_(scale)
        return out.add_(offset) if offset is not None else out
    return _AffineFakeQuant.apply(x, scale, offset, qmin, qmax, scale_grad, offset_grad)


@dataclass
class FakeQuantArgs:
    """The arguments of :func:`affine_fake_quant` for one input ``x``: ``scale`` and ``offset`` broadcast against it
    (and may be views of trainable parameters), ``scale_grad``/``offset_grad`` are LSQ's gradient factors."""

    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    qmin: Bound
    qmax: Bound
    scale_grad: Union[float, torch.Tensor] = 1.0
    offset_grad: Union[float, torch.Tensor] = 1.0

    def __iter__(self):
        return iter((self.scale, self.offset, self.qmin, self.qmax, self.scale_grad, self.offset_grad))


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


def straight_through(x: torch.Tensor, value: torch.Tensor, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return ``value`` (bit-exact) with the straight-through gradient ``d out / d x = inside``.

    Args:
        x: the input that was quantized, any shape.
        value: its quantize-dequantize result, same shape as ``x``.
        inside: bool mask, same shape: where the gradient passes (the quantizer's range); ``None`` passes
            it everywhere (identity STE).
    """
    if inside is None:
        return value.detach().to(x.dtype) + (x - x.detach())
    return _StraightThrough.apply(x, value.detach().to(x.dtype), inside.detach())
