"""Memory-lean fake quantization in training: quantized operands are recomputed in the backward pass, not stored.

A quantized layer that lets autograd record everything keeps, for one forward pass, the quantized input ``x̂``
(for the weight gradient), the quantizers' own backward state and the quantized weight ``Ŵ``: about 1.5 times the
activation memory of the float layer plus a copy of the weights. Attention with quantized operands cannot use a
fused kernel and keeps ``q̂``, ``k̂``, the softmax output, its quantized copy and ``v̂`` (``[B, heads, N, N]`` twice).

Here the forward pass runs under ``no_grad`` and keeps only the float inputs; the backward pass re-runs the
quantizers on them (with gradients) and back-propagates through the recomputed piece with
``torch.autograd.grad``. The gradients are the same as without recomputation (up to float rounding: the same
kernels run in the same order). Quantizer parameters are inputs of the autograd function, so their gradients
arrive through the ordinary graph (gradient hooks, gradient accumulation and distributed reducers see them as
usual). Neither linear layers nor attention recompute their output's matrix product; attention recomputes the
logits ``q̂ k̂ᵀ`` (and the softmax) from the stored ``q``, ``k``.

Recomputation is used only when re-running the quantizers is free of side effects (see :func:`can_recompute`);
otherwise the layer records its graph as usual. ``QVIT_RECOMPUTE=0`` or :func:`use_recompute` turns it off.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers.functional import fused_without_grad

_ENABLED: Optional[bool] = None


def recompute_enabled() -> bool:
    """Whether training-time quantized layers recompute their quantized operands in the backward pass.

    Set by :func:`use_recompute`; by default from the environment variable ``QVIT_RECOMPUTE`` (``0`` turns it off).
    """
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = os.environ.get("QVIT_RECOMPUTE", "1").strip().lower() not in ("0", "false", "no", "off")
    return _ENABLED


def use_recompute(enabled: bool) -> None:
    """Turn backward-pass recomputation of quantized operands on or off for this process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def side_effect_free(hook: Callable) -> Callable:
    """Mark a quantizer forward hook as deterministic and free of side effects, so it may run twice per step."""
    hook.qvit_side_effect_free = True
    return hook


def _quantizer_is_pure(q: Optional[nn.Module]) -> bool:
    if q is None or not getattr(q, "enabled", True):
        return True
    if getattr(q, "observing", False) or not bool(getattr(q, "initialized", True)):
        return False    # observing collects statistics; an uninitialized quantizer would calibrate itself
    if q._forward_pre_hooks or q._backward_hooks or getattr(q, "_backward_pre_hooks", None):
        return False
    return all(getattr(h, "qvit_side_effect_free", False) for h in q._forward_hooks.values())


def can_recompute(module: nn.Module, quantizers: Sequence[Optional[nn.Module]]) -> bool:
    """Whether ``module`` may run its quantizers under ``no_grad`` and again in the backward pass.

    True when recomputation is enabled, gradients are being recorded, ``module`` is training, nothing is being
    compiled, and every quantizer in ``quantizers`` (``None`` for float sites) is disabled or calibrated, not
    observing, and has no hooks other than ones marked with :func:`side_effect_free`.
    """
    if not (recompute_enabled() and torch.is_grad_enabled() and module.training):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    return all(_quantizer_is_pure(q) for q in quantizers)


def quantizer_parameters(quantizers: Sequence[Optional[nn.Module]]) -> List[torch.Tensor]:
    """The trainable parameters of ``quantizers`` (each once)."""
    seen, out = set(), []
    for q in quantizers:
        if q is None:
            continue
        for p in q.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


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


class _RecomputedQuantLinear(torch.autograd.Function):
    """``F.linear(input_quantizer(x), weight_quantizer(W), b)`` keeping ``x`` and ``W`` instead of ``x̂`` and ``Ŵ``."""

    @staticmethod
    def forward(ctx, module, x, weight, bias, *params):
        with torch.no_grad(), fused_without_grad():
            y = F.linear(module._quant("input", x), module._quant("weight", weight), bias)
        ctx.module, ctx.bias_dtype = module, None if bias is None else bias.dtype
        ctx.amp = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, *params)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad(), _autocast(ctx.amp):
            x_leaf, w_leaf = _leaf(x, need[1]), _leaf(weight, need[2])
            xq = ctx.module._quant("input", x_leaf)
            wq = ctx.module._quant("weight", w_leaf)
            grad2 = grad.reshape(-1, grad.shape[-1])
            grad_xq = grad @ wq.detach().to(grad.dtype) if xq.requires_grad else None
            grad_wq = (grad2.t() @ xq.detach().reshape(-1, xq.shape[-1]).to(grad.dtype)) if wq.requires_grad else None
            grad_x, grad_w, *grad_params = _grads((xq, wq), (grad_xq, grad_wq), (x_leaf, w_leaf, *params))
        grad_b = grad2.sum(0).to(ctx.bias_dtype) if need[3] else None
        return (None, grad_x, grad_w, grad_b, *grad_params)


def quant_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear``'s training forward ``[..., in] -> [..., out]`` with quantized operands recomputed in backward."""
    params = quantizer_parameters((module.input_quantizer, module.weight_quantizer))
    return _RecomputedQuantLinear.apply(module, x, module.weight, module.bias, *params)


class _RecomputedMatmul(torch.autograd.Function):
    """``a @ b`` with ``(a, b) = fn(*inputs)`` evaluated without a graph; the backward pass re-runs ``fn`` with one,
    forms ``grad_a``, ``grad_b`` from the output gradient and back-propagates (the product is not recomputed)."""

    @staticmethod
    def forward(ctx, fn, num_inputs, *tensors):
        inputs = tensors[:num_inputs]
        with torch.no_grad(), fused_without_grad():
            a, b = fn(*inputs)
            out = a @ b
        ctx.fn, ctx.num_inputs = fn, num_inputs
        device = next(t.device for t in tensors if t is not None)
        ctx.amp = _autocast_state(device.type)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        n = ctx.num_inputs
        with torch.enable_grad(), _autocast(ctx.amp):
            leaves = [_leaf(t, need[i]) for i, t in enumerate(tensors[:n])]
            params = list(tensors[n:])
            a, b = ctx.fn(*leaves)
            grad = grad.contiguous()      # often a transposed view; both products below would copy it
            grad_a = grad @ b.detach().transpose(-2, -1) if a.requires_grad else None
            grad_b = a.detach().transpose(-2, -1) @ grad if b.requires_grad else None
            grads = _grads((a, b), (grad_a, grad_b), (*leaves, *params))
        return (None, None, *grads)


def recomputed_matmul(fn: Callable[..., Tuple[torch.Tensor, torch.Tensor]], inputs: Sequence[Optional[torch.Tensor]],
                      params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``a @ b`` with ``(a, b) = fn(*inputs)``, storing only ``inputs`` and ``params`` for the backward pass, which
    recomputes ``a`` and ``b`` (not their product).

    ``fn`` must be deterministic and depend on trainable tensors only through ``inputs`` and ``params`` (the
    parameters it reads, e.g. its quantizers'); ``None`` inputs are passed through.
    """
    return _RecomputedMatmul.apply(fn, len(inputs), *inputs, *params)
