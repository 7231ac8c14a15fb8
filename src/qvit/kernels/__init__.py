"""The speed machinery, behind :class:`qvit.backend.Backend`: nothing here changes a result beyond float rounding.

- :mod:`.fused`: compiled fake-quantization kernels (``settings.fused``);
- :mod:`.static_graphs`: hot kernel signatures as static Inductor graphs (CPU, ``settings.static_kernels``);
- :mod:`.recompute`: training products that keep float operands and recompute the quantized ones in the backward
  pass (``settings.recompute``), with an MLP's activation folded into its second layer's kernels;
- :mod:`.scratch`: a pool of CPU buffers for the tensors one pass forms and drops;
- :mod:`.memory`: handing freed heap pages back to the OS (glibc).

Importing qvit installs :class:`KernelBackend`; ``qvit.backend.set_backend(qvit.backend.Backend())`` runs the plain
reference instead.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..backend import Backend, set_backend
from ..quantizers.functional import FakeQuantArgs
from .fused import fake_quant
from .memory import release_freed_memory
from .recompute import can_recompute, quant_linear, quant_matmul
from .scratch import release_scratch


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def activation_prologue(act: nn.Module) -> Optional[str]:
    """The :data:`~.fused.PROLOGUES` entry that computes the activation module ``act``, if any."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is TimmGELU:
        return "gelu"
    if type(act) is TimmGELUTanh:
        return "gelu_tanh"
    if type(act) is nn.ReLU:
        return "relu"
    return None


def mlp_prologue(mlp: nn.Module) -> Optional[str]:
    """The activation a timm ``Mlp`` may apply inside its second layer's kernels in this forward pass, or ``None``.

    Only when ``fc2`` recomputes its operands (:func:`.recompute.can_recompute`), the activation is GELU (exact or
    tanh) or ReLU, dropout between the layers is off, there is no norm between them and no hooks watch ``act``,
    the dropout, the norm or ``fc2``: then the arithmetic is the same as timm's forward."""
    fc2 = mlp.fc2
    qa, qw = getattr(fc2, "input_quantizer", None), getattr(fc2, "weight_quantizer", None)
    if not hasattr(fc2, "input_quantizer") or not can_recompute(fc2, (qa, qw)):
        return None
    drop = mlp.drop1
    if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
        return None
    if not isinstance(mlp.norm, nn.Identity) or _global_forward_hooks or _global_forward_pre_hooks:
        return None
    if any(_hooked(m) for m in (mlp.act, drop, mlp.norm, fc2)):
        return None
    return activation_prologue(mlp.act)


class KernelBackend(Backend):
    """Compiled fake quantization everywhere, recomputed quantized products in training."""

    name = "kernels"

    def fake_quant(self, x: torch.Tensor, args: FakeQuantArgs) -> torch.Tensor:
        return fake_quant(x, args)

    def linear(self, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not can_recompute(module, (module.input_quantizer, module.weight_quantizer)):
            return None
        return quant_linear(module, x)      # keeps x, not x̂ and Ŵ, for the backward pass

    def mlp(self, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        prologue = mlp_prologue(module)
        if prologue is None:
            return None
        # fc2 keeps fc1's output instead of the activation's: one tensor [B, N, hidden] and a pass each way saved
        return module.drop2(quant_linear(module.fc2, module.fc1(x), prologue))

    def attention(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dropout: Optional[nn.Module] = None, add_to_logits: Optional[Callable[..., torch.Tensor]] = None,
                  logit_terms: Sequence[torch.Tensor] = ()) -> Optional[torch.Tensor]:
        dropping = dropout is not None and dropout.training and getattr(dropout, "p", 0.0) > 0
        if module.tap is not None or dropping:
            return None
        quant = {name: getattr(module, f"{name}_quantizer") for name, _ in module.quant_slots}
        if not can_recompute(module, tuple(quant.values())):
            return None
        # two products with recomputed quantized factors; the softmax output between them is stored. Views into
        # qkv would make the compiled kernels write strided memory, several times slower than one copy.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        logits = quant_matmul(q if module.scale_after_matmul else q * scale, k, quant["q"], quant["k"],
                              module.logit_factor(scale), transpose_b=True)
        if add_to_logits is not None:
            logits = add_to_logits(logits, *logit_terms)
        return quant_matmul(logits.softmax(dim=-1), v, quant["probs"], quant["v"])

    def release(self) -> None:
        release_scratch()
        release_freed_memory()


set_backend(KernelBackend())
