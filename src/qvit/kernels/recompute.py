"""Memory-lean fake quantization in training: quantized operands are recomputed in the backward pass, not stored.

A quantized layer that lets autograd record everything keeps, for one forward pass, the quantized input ``x̂``
(for the weight gradient), the quantizers' own backward state and the quantized weight ``Ŵ``: about 1.5 times the
activation memory of the float layer plus a copy of the weights. Attention with quantized operands cannot use a
fused kernel and keeps ``q̂``, ``k̂``, the softmax output, its quantized copy and ``v̂`` (``[B, heads, N, N]`` twice).

Here the forward pass runs under ``no_grad`` and keeps only the float factors of each matrix product (a linear
layer's input and weight; attention's ``q``, ``k`` and its softmax output ``p``, which the softmax keeps for its own
backward pass anyway, and ``v``); the backward pass quantizes them again and back-propagates through the
quantizers. For affine quantizers (LSQ, LSQ+, uniform; see :meth:`Quantizer.fake_quant_args`) without hooks, it
computes their gradients directly from the float factor and the product's gradient, one compiled pass that also
forms the quantized value where the product's other gradient needs it; other quantizers are re-run with a graph
and back-propagated with ``torch.autograd.grad``. The gradients are those of the plain path (up to float
rounding). Quantizer parameters are inputs of the autograd function, so their gradients arrive through the
ordinary graph (gradient hooks, gradient accumulation and distributed reducers see them as usual). No matrix
product is recomputed. The quantized factors and intermediate gradients, which live only within one pass, are
borrowed from :mod:`.scratch` (CPU).

Recomputation is used only when re-running the quantizers is free of side effects (see :func:`can_recompute`);
otherwise the layer records its graph as usual. ``qvit.settings(recompute=False)`` (``QVIT_RECOMPUTE=0``) turns it
off.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..nn.functional import scaled_matmul
from ..quantizers import Quantizer, quantizer_parameters
from ..quantizers.functional import FakeQuantArgs
from ..runtime import get_settings
from .fused import PROLOGUES, fake_quant_grads, fake_quant_value, prologue_function, recomputing
from .scratch import Scratch


def can_recompute(module: nn.Module, quantizers: Sequence[Optional[Quantizer]]) -> bool:
    """Whether ``module`` may run its quantizers under ``no_grad`` and again in the backward pass.

    True when ``settings.recompute`` is on, gradients are being recorded, ``module`` is training, nothing is being
    compiled, and every quantizer in ``quantizers`` (``None`` for float sites) :meth:`~Quantizer.reruns_safely`.
    """
    if not (get_settings().recompute and torch.is_grad_enabled() and module.training):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    return all(q is None or q.reruns_safely() for q in quantizers)


AutocastState = Tuple[str, bool, torch.dtype]


def _autocast_state(device_type: str) -> AutocastState:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: AutocastState):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=True) if enabled else nullcontext()


def _leaf(t: Optional[torch.Tensor], needs_grad: bool) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().requires_grad_(needs_grad)


def _grads(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
           inputs: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """``d(outputs)/d(inputs)`` contracted with ``grad_outputs``; ``None`` for inputs without (or not needing) one."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    result: List[Optional[torch.Tensor]] = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = g
    return result


@lru_cache(maxsize=None)
def _affine_class(cls: type) -> bool:
    """Whether ``cls.fake_quant`` is ``affine_fake_quant(x, *cls.fake_quant_args(x))``: the class that defines
    ``fake_quant_args`` is the one that defines ``fake_quant`` or a subclass of it."""
    def owner(name: str) -> type:
        return next(c for c in cls.__mro__ if name in c.__dict__)
    return issubclass(owner("fake_quant_args"), owner("fake_quant"))


def _direct_args(q: nn.Module, x: torch.Tensor) -> Optional[FakeQuantArgs]:
    """``q``'s :class:`FakeQuantArgs` for ``x`` when its gradients may be computed without its graph: an affine
    quantizer without hooks (a hook may change the output)."""
    if q._forward_hooks or q._forward_pre_hooks or q._backward_hooks or getattr(q, "_backward_pre_hooks", None):
        return None
    if _global_forward_hooks or _global_forward_pre_hooks or not _affine_class(type(q)):
        return None
    return q.fake_quant_args(x)


class _Factor:
    """One factor of a recomputed product in the backward pass: its quantized value and the gradients through its
    quantizer (computed directly for affine quantizers, by autograd through the quantizer otherwise)."""

    def __init__(self, quantizer: Optional[nn.Module], t: torch.Tensor, needs_grad: bool,
                 prologue: Optional[str] = None) -> None:
        self.quantizer = quantizer if quantizer is not None and getattr(quantizer, "enabled", True) else None
        self.t, self.needs_grad, self.prologue = t, needs_grad, prologue
        self.args = None if self.quantizer is None else _direct_args(self.quantizer, t)
        self.leaf: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self.grad: Optional[torch.Tensor] = None     # of ``t``, when computed directly
        #: (tensor, gradient) pairs left to autograd: the quantizer's graph, or its scale/offset views
        self.pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def wants_grad(self) -> bool:
        """Whether the gradient of the quantized value is needed (for ``t`` or the quantizer's parameters)."""
        if self.needs_grad:
            return True
        if self.args is not None:
            return self.args.scale.requires_grad or (self.args.offset is not None and self.args.offset.requires_grad)
        return self.quantizer is not None and any(p.requires_grad for p in self.quantizer.parameters())

    def compute_value(self, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """The quantized value, without its gradient; formed in a buffer of ``scratch`` where one is given and the
        quantizer is affine (the value must then not outlive the scratch)."""
        if self.quantizer is None:
            with torch.no_grad():
                self.value = prologue_function(self.prologue)(self.t)
        elif self.args is not None:
            out = None if scratch is None else scratch.empty_like(self.t)
            self.value = fake_quant_value(self.t, self.args, self.prologue, out=out)
        else:
            self.leaf = _leaf(self.t, self.needs_grad)
            self.value = self.quantizer(prologue_function(self.prologue)(self.leaf))
        return self.value

    def scratch_grad(self, scratch: Scratch, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """A pooled buffer for the gradient of the quantized value (``t``'s shape, ``grad``'s dtype), where only the
        direct path reads it (its results never alias it); ``None`` otherwise."""
        if self.args is None or self.t.dtype != grad.dtype:
            return None
        return scratch.empty(self.t.shape, grad)

    def back_propagate(self, grad_value: Optional[torch.Tensor], value: bool = False,
                       scratch: Optional[Scratch] = None) -> None:
        """Take the gradient of the quantized value; with ``value=True`` form the value in the same pass (in a
        buffer of ``scratch`` where :meth:`compute_value` would use one)."""
        if grad_value is None:
            if value:
                self.compute_value(scratch)
            return
        grad_value = grad_value.to(self.t.dtype)
        if self.quantizer is None and self.prologue is None:
            self.value = self.t if value else self.value
            self.grad = grad_value if self.needs_grad else None
        elif self.quantizer is None:
            if value:
                self.compute_value()
            self.grad = PROLOGUES[self.prologue][1](grad_value, self.t) if self.needs_grad else None
        elif self.args is not None:
            out, self.grad, grad_scale, grad_offset = fake_quant_grads(
                self.t, grad_value, self.args, value=value, need_x=self.needs_grad, prologue=self.prologue,
                out=scratch.empty_like(self.t) if value and scratch is not None else None)
            if value:
                self.value = out
            if grad_scale is not None:
                self.pairs.append((self.args.scale, grad_scale))
            if grad_offset is not None:
                self.pairs.append((self.args.offset, grad_offset))
        else:
            if value:
                self.compute_value()
            if self.value.requires_grad:
                self.pairs.append((self.value, grad_value))


class _QuantProduct(torch.autograd.Function):
    """``alpha · quant_a(f(a)) @ quant_b(b)`` (or ``@ quant_b(b)ᵀ``; for a 2-d ``b`` with ``transpose_b`` the linear
    layer ``F.linear(quant_a(f(a)), quant_b(b), bias)``), keeping ``a`` and ``b`` instead of the quantized factors;
    ``f`` is the elementwise ``prologue`` (e.g. the activation before an MLP's second layer) or the identity.

    The backward pass forms ``quant_b(b)``, the gradient of ``quant_a(f(a))`` and, in the same pass over ``a``,
    ``quant_a(f(a))`` with its gradients, then the gradient of ``quant_b(b)`` and its gradients."""

    @staticmethod
    def forward(ctx, qa, qb, alpha, transpose_b, prologue, a, b, bias, *params):
        # the kernels the backward pass runs, for the same values; the quantized factors in pooled buffers
        with torch.no_grad(), recomputing(), Scratch() as scratch:
            a_hat = _Factor(qa, a, False, prologue).compute_value(scratch)
            b_hat = _Factor(qb, b, False).compute_value(scratch)
            if b.dim() == 2 and transpose_b:
                out = F.linear(a_hat, b_hat, bias)
                if alpha != 1.0:
                    raise ValueError("a linear product takes no factor")
            else:
                out = scaled_matmul(a_hat, b_hat.transpose(-2, -1) if transpose_b else b_hat, alpha)
            a_hat = b_hat = None
        ctx.qa, ctx.qb, ctx.alpha, ctx.transpose_b, ctx.prologue = qa, qb, alpha, transpose_b, prologue
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.amp = _autocast_state(a.device.type)
        ctx.save_for_backward(a, b, *params)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        alpha, linear = ctx.alpha, b.dim() == 2 and ctx.transpose_b
        grad = grad.contiguous()      # often a transposed view; the products below would copy it
        with torch.enable_grad(), _autocast(ctx.amp), Scratch() as scratch:
            fa, fb = _Factor(ctx.qa, a, need[5], ctx.prologue), _Factor(ctx.qb, b, need[6])
            b_hat = fb.compute_value(scratch).detach().to(grad.dtype)
            grad_a_hat = None
            if fa.wants_grad():            # d/d â of alpha · â @ b̂ (or b̂ᵀ)
                grad_a_hat = scaled_matmul(grad, b_hat if ctx.transpose_b else b_hat.transpose(-2, -1), alpha,
                                           out=fa.scratch_grad(scratch, grad))
            fa.back_propagate(grad_a_hat, value=True, scratch=scratch)
            grad_a_hat = grad_b_hat = None     # transients are dropped as soon as they are used (peak memory)
            if fb.wants_grad():
                a_hat = fa.value.detach().to(grad.dtype)
                if linear:
                    grad_b_hat = grad.reshape(-1, grad.shape[-1]).t() @ a_hat.reshape(-1, a_hat.shape[-1])
                elif ctx.transpose_b:
                    grad_b_hat = scaled_matmul(grad.transpose(-2, -1), a_hat, alpha, out=fb.scratch_grad(scratch, grad))
                else:
                    grad_b_hat = scaled_matmul(a_hat.transpose(-2, -1), grad, alpha, out=fb.scratch_grad(scratch, grad))
                a_hat = None
            fa.value = b_hat = None
            fb.back_propagate(grad_b_hat)
            grad_b_hat = fb.value = None
            pairs = fa.pairs + fb.pairs
            grads = _grads([t for t, _ in pairs], [g for _, g in pairs], (fa.leaf, fb.leaf, *params))
        grad_a = fa.grad if fa.grad is not None else grads[0]
        grad_b = fb.grad if fb.grad is not None else grads[1]
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if need[7] else None
        return (None, None, None, None, None, grad_a if need[5] else None, grad_b if need[6] else None, grad_bias,
                *grads[2:])


def quant_linear(module: nn.Module, x: torch.Tensor, prologue: Optional[str] = None) -> torch.Tensor:
    """``QuantLinear``'s training forward ``[..., in] -> [..., out]`` with quantized operands recomputed in backward;
    with a ``prologue`` (a name in :data:`~.fused.PROLOGUES`) the layer's input is ``f(x)``."""
    qa, qb = module.input_quantizer, module.weight_quantizer
    return _QuantProduct.apply(qa, qb, 1.0, True, prologue, x, module.weight, module.bias,
                               *quantizer_parameters((qa, qb)))


def quant_matmul(a: torch.Tensor, b: torch.Tensor, qa: Optional[nn.Module], qb: Optional[nn.Module],
                 alpha: float = 1.0, transpose_b: bool = False) -> torch.Tensor:
    """``alpha · qa(a) @ qb(b)`` (``qb(b)ᵀ`` with ``transpose_b``) for ``[..., n, k]``/``[..., k, m]`` factors with
    equal batch dimensions, storing only ``a`` and ``b`` for the backward pass, which recomputes the quantized
    factors (not their product). ``None`` quantizers leave a factor in float."""
    return _QuantProduct.apply(qa, qb, float(alpha), transpose_b, None, a, b, None, *quantizer_parameters((qa, qb)))
