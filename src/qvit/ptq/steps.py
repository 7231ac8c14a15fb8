"""PTQ pipeline steps, registered by name, run in the order a recipe lists them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .calibrate import calibrate

_STEPS: Dict[str, Callable[..., None]] = {}


@dataclass
class PTQContext:
    """What a step can use: the prepared model, the calibration images and (when a step needs one)
    the float model; ``log`` collects per-step records for reports."""

    model: nn.Module
    calib_data: torch.Tensor
    fp_model: Optional[nn.Module] = None
    progress: bool = True
    batch_size: int = 32
    log: List[Dict[str, Any]] = field(default_factory=list)


def register_step(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: make ``fn(ctx, **params)`` available to recipes as ``name``."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        if name in _STEPS and _STEPS[name] is not fn:
            raise ValueError(f"PTQ step {name!r} is already registered")
        _STEPS[name] = fn
        return fn

    return wrap


def get_step(name: str) -> Callable[..., None]:
    try:
        return _STEPS[name]
    except KeyError:
        raise KeyError(f"unknown PTQ step {name!r}; known: {', '.join(sorted(_STEPS))}") from None


def list_steps() -> List[str]:
    return sorted(_STEPS)


@register_step("calibrate")
def calibrate_step(ctx: PTQContext, sequential: bool = False) -> None:
    """Calibrate every uncalibrated quantizer on the calibration images."""
    calibrate(ctx.model, ctx.calib_data, sequential=sequential, batch_size=ctx.batch_size, progress=ctx.progress)
