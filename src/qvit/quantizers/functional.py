"""Differentiable rounding primitives shared by the quantizer families."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from .static_kernels import StaticKernelCache

Bound = Union[float, torch.Tensor]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _sum_to(grad: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
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
        grad_x, grad_scale_, grad_offset = _affine_grads(
            grad, v, q, qmin, qmax, scale.shape, offset.shape if need_offset else None,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_offset)
        if grad_scale_ is not None:
            grad_scale_ = grad_scale_ * ctx.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * ctx.offset_grad
        return grad_x, grad_scale_, grad_offset, None, None, None, None


def _affine_grads(grad, v, q, qmin: Bound, qmax: Bound, scale_shape: Sequence[int],
                  offset_shape: Optional[Sequence[int]], need_x: bool, need_scale: bool, need_offset: bool):
    """Input, scale and offset gradients of fake quantization (before LSQ's gradient factors) from the output
    gradient ``grad``, ``v = (x - offset) / scale`` and ``q = clamp(round(v), qmin, qmax)``."""
    inside = (v > qmin) & (v < qmax)
    grad_x = torch.where(inside, grad, 0.0) if need_x else None
    grad_scale = _sum_to(grad * torch.where(inside, q - v, q), scale_shape) if need_scale else None
    grad_offset = _sum_to(torch.where(inside, 0.0, grad), offset_shape) if need_offset else None
    return grad_x, grad_scale, grad_offset


#: ``r`` codes of the fused kernels for elements outside the range (inside, ``|r| <= 0.5``)
_ABOVE, _BELOW = 4.0, -4.0


def _dense(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in contiguous memory (channels-last if ``like`` is a channels-last image batch). A compiled kernel that
    writes the layout of a strided input (attention's ``q``, ``k``, ``v`` are views into ``qkv``) runs several times
    slower, and every matrix product downstream would copy it again."""
    channels_last = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _gelu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_tanh_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def _relu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, grad, 0.0)


#: elementwise functions a quantizer's kernels may apply to their input first: name -> (function, gradient),
#: ``gradient(grad_out, x)`` is ``grad_out · f'(x)``
PROLOGUES = {
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "relu": (torch.relu, _relu_grad),
}


def prologue_function(name: Optional[str]):
    """The elementwise function registered as ``name`` in :data:`PROLOGUES` (identity for ``None``)."""
    return (lambda x: x) if name is None else PROLOGUES[name][0]


def _fake_quant_terms(x, scale, offset, qmin: Bound, qmax: Bound):
    """``(v, q, x̂)`` with ``v = (x - offset) / scale``, ``q = clamp(round(v))`` and ``x̂ = q * scale + offset``
    (``x̂`` in dense memory, see :func:`_dense`)."""
    v = (x - offset) / scale if offset is not None else x / scale
    q = torch.clamp(torch.round(v), qmin, qmax)
    return v, q, _dense(q * scale + offset if offset is not None else q * scale, x)


def _fused_forward(x, scale, offset, qmin: Bound, qmax: Bound):
    """``(x̂, r)``: the fake-quantized ``x`` and, in float16, ``r = round(v) - v`` where ``qmin < v < qmax``,
    ``_ABOVE`` where ``v >= qmax`` and ``_BELOW`` where ``v <= qmin`` (``v = (x - offset) / scale``)."""
    v, q, out = _fake_quant_terms(x, scale, offset, qmin, qmax)
    r = torch.where(v >= qmax, _ABOVE, torch.where(v <= qmin, _BELOW, q - v))
    return out, _dense(r.to(torch.float16), x)


def _fused_fake_quant(x, scale, offset, qmin: Bound, qmax: Bound, prologue: Optional[str] = None):
    """``x̂`` alone: the value ``_fused_forward`` returns, for passes that need no gradient (of ``f(x)`` with a
    ``prologue``)."""
    if prologue is not None:
        x = PROLOGUES[prologue][0](x)
    return _fake_quant_terms(x, scale, offset, qmin, qmax)[2]


def _fused_fake_quant_into(out, x, scale, offset, qmin: Bound, qmax: Bound, prologue: Optional[str] = None):
    """``_fused_fake_quant`` written into the contiguous ``out`` (compiled, the kernel stores there directly)."""
    out.copy_(_fused_fake_quant(x, scale, offset, qmin, qmax, prologue))


def _fused_value_and_grads(x, grad, scale, offset, qmin: Bound, qmax: Bound, scale_shape: Sequence[int],
                           offset_shape: Optional[Sequence[int]], need_x: bool, need_scale: bool, need_offset: bool,
                           prologue: Optional[str] = None):
    """``(x̂, grad_x, grad_scale, grad_offset)`` from ``x`` and the output gradient ``grad`` in one pass; with a
    ``prologue`` the quantized value is that of ``f(x)`` and ``grad_x`` its gradient through ``f``."""
    h = x
    if prologue is not None:
        x = PROLOGUES[prologue][0](h)
    v, q, out = _fake_quant_terms(x, scale, offset, qmin, qmax)
    grad_x, grad_scale, grad_offset = _affine_grads(grad, v, q, qmin, qmax, scale_shape, offset_shape, need_x,
                                                    need_scale, need_offset)
    if grad_x is not None and prologue is not None:
        grad_x = PROLOGUES[prologue][1](grad_x, h)
    return out, None if grad_x is None else _dense(grad_x, h), grad_scale, grad_offset


def _fused_value_into_and_grads(out, x, grad, scale, offset, qmin: Bound, qmax: Bound, scale_shape: Sequence[int],
                                offset_shape: Optional[Sequence[int]], need_x: bool, need_scale: bool,
                                need_offset: bool, prologue: Optional[str] = None):
    """``_fused_value_and_grads`` with ``x̂`` written into the contiguous ``out``; returns
    ``(grad_x, grad_scale, grad_offset)``."""
    value, grad_x, grad_scale, grad_offset = _fused_value_and_grads(
        x, grad, scale, offset, qmin, qmax, scale_shape, offset_shape, need_x, need_scale, need_offset, prologue)
    out.copy_(value)
    return grad_x, grad_scale, grad_offset


def _fused_grads(x, grad, scale, offset, qmin: Bound, qmax: Bound, scale_shape: Sequence[int],
                 offset_shape: Optional[Sequence[int]], need_x: bool, need_scale: bool, need_offset: bool,
                 prologue: Optional[str] = None):
    """``(grad_x, grad_scale, grad_offset)`` from ``x`` and the output gradient ``grad`` (``x̂`` not formed)."""
    h = x
    if prologue is not None:
        x = PROLOGUES[prologue][0](h)
    v = (x - offset) / scale if offset is not None else x / scale
    q = torch.clamp(torch.round(v), qmin, qmax)
    grad_x, grad_scale, grad_offset = _affine_grads(grad, v, q, qmin, qmax, scale_shape, offset_shape, need_x,
                                                    need_scale, need_offset)
    if grad_x is not None and prologue is not None:
        grad_x = PROLOGUES[prologue][1](grad_x, h)
    return None if grad_x is None else _dense(grad_x, h), grad_scale, grad_offset


def _fused_backward(grad, r, scale_shape: Sequence[int], offset_shape: Optional[Sequence[int]], qmin: Bound,
                    qmax: Bound, need_x: bool, need_scale: bool, need_offset: bool):
    """Input, scale and offset gradients of ``_fused_forward`` from its ``r`` (LSQ/LSQ+ as in ``_AffineFakeQuant``)."""
    rf = r.to(grad.dtype)
    inside = rf.abs() <= 0.5
    grad_x = torch.where(inside, grad, 0.0) if need_x else None
    grad_scale = grad_offset = None
    if need_scale:
        local = torch.where(inside, rf, torch.where(rf > 0, qmax, qmin).to(grad.dtype))
        grad_scale = _sum_to(grad * local, scale_shape)
    if need_offset:
        grad_offset = _sum_to(torch.where(inside, 0.0, grad), offset_shape)
    return grad_x, grad_scale, grad_offset


_BOUNDS: dict = {}


def _bound_tensor(b: Bound, like: torch.Tensor) -> torch.Tensor:
    """A range bound as a tensor (numbers as cached 0-d tensors: each value would otherwise compile anew)."""
    if torch.is_tensor(b):
        return b.detach()
    key = (float(b), like.dtype, like.device)
    if key not in _BOUNDS:
        _BOUNDS[key] = torch.tensor(float(b), dtype=like.dtype, device=like.device)
    return _BOUNDS[key]


class _FusedAffineFakeQuant(torch.autograd.Function):
    """``_AffineFakeQuant`` with compiled (fused) forward and backward kernels.

    It keeps ``r`` (float16, half the bytes of ``x``) for the backward pass instead of ``x``; the scale gradient
    therefore uses ``round(v) - v`` to float16 precision (about 2e-4 absolute), everything else is exact.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, scale_grad, offset_grad):
        qmin, qmax = _bound_tensor(qmin, x), _bound_tensor(qmax, x)
        out, r = _run(_fused_forward, x, scale, offset, qmin, qmax)
        ctx.save_for_backward(r, qmin, qmax)
        ctx.scale_shape, ctx.offset_shape = tuple(scale.shape), None if offset is None else tuple(offset.shape)
        ctx.scale_grad, ctx.offset_grad = scale_grad, offset_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        r, qmin, qmax = ctx.saved_tensors
        need_offset = ctx.offset_shape is not None and ctx.needs_input_grad[2]
        grad_x, grad_scale, grad_offset = _run(
            _fused_backward, grad.contiguous(), r, ctx.scale_shape, ctx.offset_shape, qmin, qmax,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_offset)
        if grad_scale is not None:
            grad_scale = grad_scale * ctx.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * ctx.offset_grad
        return grad_x, grad_scale, grad_offset, None, None, None, None


#: the statically compiled graphs of hot call signatures (CPU)
STATIC_KERNELS = StaticKernelCache()
#: compiled variants allowed per kernel (ranks, broadcast patterns, strides and dtypes each make one)
RECOMPILE_LIMIT = 64
_COMPILED: dict = {}


def _run(kernel, *args):
    """Run ``kernel`` (one of the ``_fused_*`` functions), compiled while :func:`fused_kernels_enabled`.

    Signatures a loop repeats run a statically compiled graph instead (:mod:`.static_kernels`: no Dynamo dispatch
    per call). If compiling fails (no working C++ toolchain, say) the kernels are turned off for the process with a
    warning and the same function runs eagerly."""
    if fused_kernels_enabled():
        if kernel not in _COMPILED:
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            _COMPILED[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
        static = STATIC_KERNELS.lookup(kernel, args)
        if static is None or torch.is_grad_enabled():
            # a Parameter would compile anew; a static graph must not record autograd history
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        if static is not None:
            return static(args)
        try:
            return _COMPILED[kernel](*args)
        except Exception as err:     # noqa: BLE001 (any compiler failure: the eager function computes the same)
            use_fused_kernels(False)
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"qvit: compiled fake-quantization kernels are unavailable ({type(err).__name__}: "
                          f"{first}); using eager kernels (QVIT_FUSED=0 skips the attempt)", RuntimeWarning)
    return kernel(*args)


_FUSED: Optional[bool] = None
_FUSED_WITHOUT_GRAD = 0


@contextmanager
def fused_without_grad() -> Iterator[None]:
    """Inside, gradient-free ``affine_fake_quant`` also runs a compiled kernel (while :func:`fused_kernels_enabled`).

    A training layer that computes its forward pass without a graph and recomputes it in the backward pass uses
    this, so both passes run the same kernels as a layer that records its graph (one pass over ``x``).
    """
    global _FUSED_WITHOUT_GRAD
    _FUSED_WITHOUT_GRAD += 1
    try:
        yield
    finally:
        _FUSED_WITHOUT_GRAD -= 1


def fused_kernels_enabled() -> bool:
    """Whether training-time uniform fake quantization runs the compiled kernels (``torch.compile``).

    Set by :func:`use_fused_kernels`; by default from the environment variable ``QVIT_FUSED`` (``0`` turns them
    off; they are on otherwise). They are turned off for the rest of the process, with a warning, if compiling fails.
    """
    global _FUSED
    if _FUSED is None:
        _FUSED = os.environ.get("QVIT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
    return _FUSED


def use_fused_kernels(enabled: bool) -> None:
    """Turn the compiled training-time kernels of ``affine_fake_quant`` on or off for this process."""
    global _FUSED
    _FUSED = bool(enabled)


def affine_fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor], qmin: Bound,
                      qmax: Bound, scale_grad: float = 1.0, offset_grad: float = 1.0) -> torch.Tensor:
    """Uniform fake quantization ``clamp(round((x - offset)/scale), qmin, qmax) * scale + offset``.

    ``scale``, ``offset``, ``qmin`` and ``qmax`` broadcast against ``x``. The input gradient is the
    straight-through estimate inside the range and zero outside; the scale/offset gradients are LSQ's
    (times ``scale_grad``/``offset_grad``). With gradients this runs the compiled kernels when
    :func:`fused_kernels_enabled` (one pass over ``x`` forward and one backward); without, in-place eager ops.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or
                                              (offset is not None and offset.requires_grad))
    if not needs_grad:
        if _FUSED_WITHOUT_GRAD and fused_kernels_enabled() and not torch.compiler.is_compiling():
            return _run(_fused_fake_quant, x, scale, offset, _bound_tensor(qmin, x), _bound_tensor(qmax, x))
        v = x - offset if offset is not None else x
        out = torch.div(v, scale).round_().clamp_(qmin, qmax).mul_(scale)
        return out.add_(offset) if offset is not None else out
    if fused_kernels_enabled() and not torch.compiler.is_compiling():
        return _FusedAffineFakeQuant.apply(x, scale, offset, qmin, qmax, scale_grad, offset_grad)
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


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")


def affine_fake_quant_value(x: torch.Tensor, args: FakeQuantArgs, prologue: Optional[str] = None,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``affine_fake_quant(f(x), *args)`` without a graph (the compiled kernel while :func:`fused_kernels_enabled`);
    ``f`` is the elementwise function registered as ``prologue`` in :data:`PROLOGUES` (identity for ``None``).
    Written into ``out`` (contiguous, ``x``'s shape and dtype) when given."""
    with torch.no_grad():
        rest = (args.scale, args.offset, _bound_tensor(args.qmin, x), _bound_tensor(args.qmax, x), prologue)
        if out is None:
            return _run(_fused_fake_quant, x, *rest)
        _check_out(out, x)
        _run(_fused_fake_quant_into, out, x, *rest)
        return out


def affine_fake_quant_grads(x: torch.Tensor, grad: torch.Tensor, args: FakeQuantArgs, *, value: bool,
                            need_x: bool, prologue: Optional[str] = None,
                            out: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``affine_fake_quant(f(x), *args)`` for the output gradient ``grad`` (same shape as ``x``),
    computed from ``x`` in one pass and without a graph: ``(x̂, grad_x, grad_scale, grad_offset)``.

    ``f`` is the elementwise function registered as ``prologue`` in :data:`PROLOGUES` (identity for ``None``).
    ``x̂`` is formed only with ``value=True`` (in ``out`` when given: contiguous, ``x``'s shape and dtype) and
    ``grad_x`` only with ``need_x``; ``grad_scale``/``grad_offset``
    (shaped like ``args.scale``/``args.offset``, LSQ's factors applied) only where those require gradients. Equal
    to back-propagating through ``f`` and :func:`affine_fake_quant`, with ``round(v) - v`` exact rather than in
    float16.
    """
    need_scale = args.scale.requires_grad
    need_offset = args.offset is not None and args.offset.requires_grad
    # strided inputs (views into a larger tensor) make these kernels an order of magnitude slower than a copy
    x = _dense(x, x)
    grad = _dense(grad, x)
    with torch.no_grad():
        qmin, qmax = _bound_tensor(args.qmin, x), _bound_tensor(args.qmax, x)
        rest = (args.scale, args.offset, qmin, qmax, tuple(args.scale.shape),
                None if args.offset is None else tuple(args.offset.shape), need_x, need_scale, need_offset, prologue)
        if value and out is not None:
            _check_out(out, x)
            grad_x, grad_scale, grad_offset = _run(_fused_value_into_and_grads, out, x, grad, *rest)
        elif value:
            out, grad_x, grad_scale, grad_offset = _run(_fused_value_and_grads, x, grad, *rest)
        else:
            out, (grad_x, grad_scale, grad_offset) = None, _run(_fused_grads, x, grad, *rest)
        if grad_scale is not None:
            grad_scale = grad_scale * args.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * args.offset_grad
    return out, grad_x, grad_scale, grad_offset


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
