"""Compiled fake-quantization kernels (``torch.compile``; on the CPU, hot signatures as static graphs).

The same arithmetic as :func:`qvit.quantizers.functional.affine_fake_quant`, in fewer passes over memory:

- :class:`FusedAffineFakeQuant` computes ``x̂`` in one pass and keeps ``r = round(v) - v`` in float16 (half the
  bytes of ``x``) for its backward pass instead of ``x``; the scale gradient therefore uses ``r`` to float16
  precision (about 2e-4 absolute), everything else is exact.
- :func:`fake_quant_value` and :func:`fake_quant_grads` compute ``x̂`` and the gradients without a graph, from ``x``
  and the output gradient (the backward pass of a recomputed product, :mod:`.recompute`), optionally through an
  elementwise ``prologue`` (:data:`PROLOGUES`, e.g. the GELU before an MLP's second layer).

Each kernel runs Dynamo-compiled (the recompile limit raised only while it runs); on the CPU a signature seen
``static_promote_after`` times runs a static graph instead (:mod:`.static_graphs`). A kernel whose compilation fails
runs eagerly from then on, with one warning; ``qvit.settings(fused=False)`` runs every kernel eagerly.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import torch

from ..quantizers.functional import Bound, FakeQuantArgs, affine_fake_quant, affine_grads, sum_to
from ..runtime import get_settings, on_change
from .static_graphs import StaticKernelCache


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
    grad_x, grad_scale, grad_offset = affine_grads(grad, v, q, qmin, qmax, scale_shape, offset_shape, need_x,
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
    grad_x, grad_scale, grad_offset = affine_grads(grad, v, q, qmin, qmax, scale_shape, offset_shape, need_x,
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
        grad_scale = sum_to(grad * local, scale_shape)
    if need_offset:
        grad_offset = sum_to(torch.where(inside, 0.0, grad), offset_shape)
    return grad_x, grad_scale, grad_offset


_BOUNDS: Dict[Tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def _bound_tensor(b: Bound, like: torch.Tensor) -> torch.Tensor:
    """A range bound as a tensor (numbers as cached 0-d tensors: each value would otherwise compile anew)."""
    if torch.is_tensor(b):
        return b.detach()
    key = (float(b), like.dtype, like.device)
    if key not in _BOUNDS:
        if len(_BOUNDS) >= _BOUNDS_MAX:
            _BOUNDS.clear()
        _BOUNDS[key] = torch.tensor(float(b), dtype=like.dtype, device=like.device)
    return _BOUNDS[key]


class FusedAffineFakeQuant(torch.autograd.Function):
    """``affine_fake_quant`` with gradients, as compiled forward and backward kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, scale_grad, offset_grad):
        qmin, qmax = _bound_tensor(qmin, x), _bound_tensor(qmax, x)
        out, r = run(_fused_forward, x, scale, offset, qmin, qmax)
        ctx.save_for_backward(r, qmin, qmax)
        ctx.scale_shape, ctx.offset_shape = tuple(scale.shape), None if offset is None else tuple(offset.shape)
        ctx.scale_grad, ctx.offset_grad = scale_grad, offset_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        r, qmin, qmax = ctx.saved_tensors
        need_offset = ctx.offset_shape is not None and ctx.needs_input_grad[2]
        grad_x, grad_scale, grad_offset = run(
            _fused_backward, grad.contiguous(), r, ctx.scale_shape, ctx.offset_shape, qmin, qmax,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_offset)
        if grad_scale is not None:
            grad_scale = grad_scale * ctx.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * ctx.offset_grad
        return grad_x, grad_scale, grad_offset, None, None, None, None


#: statically compiled graphs of hot call signatures (CPU)
STATIC_GRAPHS = StaticKernelCache()
_COMPILED: Dict[Callable, Callable] = {}
_BROKEN: Set[Callable] = set()
_BOUNDS_MAX = 256
_RECOMPUTING = threading.local()


def _forget_static_graphs(old, new) -> None:
    if (old.static_kernels, old.static_max_signatures) != (new.static_kernels, new.static_max_signatures):
        STATIC_GRAPHS.clear()


on_change(_forget_static_graphs)


def reset() -> None:
    """Forget every compiled kernel, static graph and compile failure (the next calls compile again)."""
    _COMPILED.clear()
    _BROKEN.clear()
    STATIC_GRAPHS.clear()


def run(kernel: Callable, *args):
    """``kernel(*args)`` (one of this module's ``_fused_*`` functions), compiled while ``settings.fused``.

    A signature the loop repeats runs its static graph (CPU, while ``settings.static_kernels``), others the
    Dynamo-compiled function; a kernel that fails to compile runs eagerly for the rest of the process."""
    cfg = get_settings()
    if not cfg.fused or kernel in _BROKEN or torch.compiler.is_compiling():
        return kernel(*args)
    static = STATIC_GRAPHS.lookup(kernel, args, cfg) if cfg.static_kernels else None
    if static is None or torch.is_grad_enabled():
        # a Parameter would compile anew; a static graph must not record autograd history
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    if static is not None:
        return static(args)
    compiled = _COMPILED.get(kernel)
    if compiled is None:
        compiled = _COMPILED[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
    try:
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                            cfg.recompile_limit)):
            return compiled(*args)
    except Exception as err:     # noqa: BLE001 (any compiler failure: the eager function computes the same)
        _BROKEN.add(kernel)
        first = str(err).splitlines()[0] if str(err) else ""
        warnings.warn(f"qvit: {kernel.__name__} could not be compiled ({type(err).__name__}: {first}); it runs "
                      "eagerly (qvit.settings(fused=False) skips compiling)", RuntimeWarning)
    return kernel(*args)


@contextmanager
def recomputing() -> Iterator[None]:
    """Inside, gradient-free fake quantization (:func:`fake_quant`) runs the compiled kernel too, so a product that
    runs its forward pass without a graph and recomputes it in the backward pass forms the same values twice."""
    _RECOMPUTING.depth = getattr(_RECOMPUTING, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTING.depth -= 1


def fake_quant(x: torch.Tensor, args: FakeQuantArgs) -> torch.Tensor:
    """``affine_fake_quant(x, *args)`` on the compiled kernels where they apply (the eager function otherwise)."""
    if not get_settings().fused or torch.compiler.is_compiling():
        return affine_fake_quant(x, *args)
    scale, offset, qmin, qmax, scale_grad, offset_grad = args
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or
                                              (offset is not None and offset.requires_grad))
    if needs_grad:
        return FusedAffineFakeQuant.apply(x, scale, offset, qmin, qmax, scale_grad, offset_grad)
    if getattr(_RECOMPUTING, "depth", 0):
        return run(_fused_fake_quant, x, scale, offset, _bound_tensor(qmin, x), _bound_tensor(qmax, x))
    return affine_fake_quant(x, *args)


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")


def fake_quant_value(x: torch.Tensor, args: FakeQuantArgs, prologue: Optional[str] = None,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``affine_fake_quant(f(x), *args)`` without a graph (the compiled kernel while ``settings.fused``);
    ``f`` is the elementwise function registered as ``prologue`` in :data:`PROLOGUES` (identity for ``None``).
    Written into ``out`` (contiguous, ``x``'s shape and dtype) when given."""
    with torch.no_grad():
        rest = (args.scale, args.offset, _bound_tensor(args.qmin, x), _bound_tensor(args.qmax, x), prologue)
        if out is None:
            return run(_fused_fake_quant, x, *rest)
        _check_out(out, x)
        run(_fused_fake_quant_into, out, x, *rest)
        return out


def fake_quant_grads(x: torch.Tensor, grad: torch.Tensor, args: FakeQuantArgs, *, value: bool,
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
            grad_x, grad_scale, grad_offset = run(_fused_value_into_and_grads, out, x, grad, *rest)
        elif value:
            out, grad_x, grad_scale, grad_offset = run(_fused_value_and_grads, x, grad, *rest)
        else:
            out, (grad_x, grad_scale, grad_offset) = None, run(_fused_grads, x, grad, *rest)
        if grad_scale is not None:
            grad_scale = grad_scale * args.scale_grad
        if grad_offset is not None:
            grad_offset = grad_offset * args.offset_grad
    return out, grad_x, grad_scale, grad_offset
