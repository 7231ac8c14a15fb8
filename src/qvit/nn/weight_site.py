"""``WeightSite``: one low-bit weight tensor as its quantizer sees it, for the tools that watch or steer weights.

Usually a site is a layer's ``weight`` parameter quantized by the layer's own weight quantizer. Two other cases exist
with query-key reparameterization (OFQ): only some rows of a parameter go through its quantizer (the value rows of
``qkv``; the query and key rows reach the model only through their product), and a quantizer may quantize a tensor
computed from parameters (the per-head product ``W_qᵀ W_k``). Oscillation tracking, freezing and confidence-guided
annealing work on sites, so each of them sees exactly the values that are rounded in the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..quantizers import Quantizer


@dataclass
class WeightSite:
    """A weight quantizer and the float tensor it rounds.

    Attributes:
        site: the site's name, e.g. ``blocks.0.mlp.fc1.weight`` or ``blocks.0.attn.qk_weight``.
        layer_name: the module that owns the parameters behind the site (``blocks.0.attn.qkv`` for both QKR sites).
        layer: that module.
        quantizer: the weight quantizer whose integer grid the site's values are rounded to.
        parameter: the trained parameter the values are (rows of); ``None`` for a computed tensor.
        rows: the rows of ``parameter`` the quantizer's output is used for (``None``: all).
        compute: for a computed tensor, a function returning it (with gradients to its parameters).
    """

    site: str
    layer_name: str
    layer: nn.Module
    quantizer: Quantizer
    parameter: Optional[nn.Parameter] = None
    rows: Optional[slice] = None
    compute: Optional[Callable[[], torch.Tensor]] = None

    def __post_init__(self) -> None:
        if (self.parameter is None) == (self.compute is None):
            raise ValueError(f"{self.site}: a weight site is either (rows of) a parameter or a computed tensor")

    @property
    def frozen_in_place(self) -> bool:
        """Whether the site is a whole parameter, so that its values can be frozen by writing the parameter."""
        return self.parameter is not None and self.rows is None

    def value(self) -> torch.Tensor:
        """The float values the quantizer rounds (with gradients to the parameters behind them)."""
        if self.compute is not None:
            return self.compute()
        return self.parameter if self.rows is None else self.parameter[self.rows]

    def _quantizer_input(self) -> torch.Tensor:
        return self.compute() if self.compute is not None else self.parameter

    def _restrict(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes of the site's values (shape of :meth:`value`)."""
        return self._restrict(self.quantizer.quantize(self._quantizer_input().detach()))

    @torch.no_grad()
    def grid_position(self) -> Optional[torch.Tensor]:
        """The pre-rounding position of the site's values in integer steps (None if the family has no such notion)."""
        fn = getattr(self.quantizer, "integer_domain", None)
        return None if fn is None else self._restrict(fn(self._quantizer_input().detach()))
