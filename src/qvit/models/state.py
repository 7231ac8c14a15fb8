"""``QuantState``: everything qvit records about a quantized model, in one object (``model.qvit_state``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch.nn as nn

from ..config import QuantConfig

ATTRIBUTE = "qvit_state"


@dataclass
class QuantState:
    """How a quantized model was built and what was done to it.

    ``config``: the :class:`QuantConfig` that builds matching quantizers (``prepare(float_model, state.config)``;
    steps that change a site's granularity record it here; for a model loaded from a packed checkpoint, the config
    the file's description turns into, one override per site). ``recipe``: the recipe that quantized the model, if
    any. ``log``: one record per pipeline step (``{"step", "params", "seconds", ...}``). ``packed``: for a model
    loaded from a packed checkpoint, the file's ``architecture``, ``recipe`` and ``qvit`` version."""

    config: Optional[QuantConfig]
    recipe: Optional[Any] = None
    log: List[Dict[str, Any]] = field(default_factory=list)
    packed: Optional[Dict[str, Any]] = None


def quant_state(model: nn.Module) -> QuantState:
    """The :class:`QuantState` of a model built by ``qvit.prepare``; a ``ValueError`` for any other model."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not built by qvit.prepare (it has no qvit state)")
    return state
