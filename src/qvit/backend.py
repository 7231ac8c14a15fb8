"""Where faster kernels plug in: one interface between the quantization math and the speed machinery.

Quantizers and quantized modules are written as plain PyTorch. At a handful of points they offer their computation
to the active :class:`Backend` first: uniform fake quantization (:meth:`Backend.fake_quant`), a quantized linear
layer, quantized attention and an MLP (:meth:`Backend.linear`, :meth:`Backend.attention`, :meth:`Backend.mlp`). This base class is the reference: it computes fake quantization eagerly and declines the rest
(``None``), so the module runs its own forward. A faster backend (:mod:`qvit.kernels`, installed when qvit is
imported) returns the same values and gradients, up to float rounding, or ``None`` where it has nothing faster.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn as nn

if TYPE_CHECKING:      # the quantizers import this module
    from .quantizers.functional import FakeQuantArgs


class Backend:
    """The reference backend: eager fake quantization, every other computation left to the module."""

    name = "reference"

    def fake_quant(self, x: torch.Tensor, args: "FakeQuantArgs") -> torch.Tensor:
        """``affine_fake_quant(x, *args)`` (any shape; ``args`` broadcast against ``x``)."""
        from .quantizers.functional import affine_fake_quant
        return affine_fake_quant(x, *args)

    def linear(self, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A ``QuantLinear``'s output ``[..., out]`` for ``x`` ``[..., in]``, or ``None``: run the plain forward."""
        return None

    def mlp(self, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A ``QuantMlp``'s output for ``x`` ``[..., in]``, or ``None``: run timm's forward."""
        return None

    def attention(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dropout: Optional[nn.Module] = None, add_to_logits: Optional[Callable[..., torch.Tensor]] = None,
                  logit_terms: Sequence[torch.Tensor] = ()) -> Optional[torch.Tensor]:
        """Quantized attention's context ``[B, heads, N, head_dim]`` (see ``QuantAttentionCore.attention``), or
        ``None``: run the plain q·kᵀ, softmax and probs·v."""
        return None

    def release(self) -> None:
        """Hand back memory held between passes (buffer pools, freed heap pages) once a phase of work ends."""


_ACTIVE: Backend = Backend()


def get_backend() -> Backend:
    """The backend quantizers and modules run on."""
    return _ACTIVE


def set_backend(backend: Backend) -> Backend:
    """Make ``backend`` the active one; returns the one it replaces."""
    global _ACTIVE
    if not isinstance(backend, Backend):
        raise TypeError(f"a backend must be a qvit.backend.Backend, got {type(backend).__name__}")
    old, _ACTIVE = _ACTIVE, backend
    return old
