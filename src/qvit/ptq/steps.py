"""PTQ pipeline steps, registered by name, run in the order a recipe lists them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..recipes import resolve_by_bits
from ..registry import Registry
from ..calibration import calibrate

STEPS: Registry[str, Callable[..., None]] = Registry("PTQ step")


@dataclass
class PTQContext:
    """What a step can use: the prepared model, the calibration images and (when a step needs one)
    the float model; ``w_bits``/``a_bits`` are the default bit-widths of the config; ``log`` collects per-step
    records for reports."""

    model: nn.Module
    calib_data: torch.Tensor
    fp_model: Optional[nn.Module] = None
    progress: bool = True
    batch_size: int = 32
    w_bits: int = 8
    a_bits: int = 8
    log: List[Dict[str, Any]] = field(default_factory=list)

    def by_bits(self, value: Union[int, float, Mapping[Any, Any]]) -> Any:
        """Resolve a step parameter that depends on the activation bit-width.

        ``value`` is a plain number, or a mapping from bit-widths to values with an optional ``default``
        (``{6: 200, 8: 200, default: 1000}``: I&S-ViT's iterations per block).
        """
        return resolve_by_bits(value, self.a_bits)


def register_step(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: make ``fn(ctx, **params)`` available to recipes as ``name``."""

    return STEPS.register(name)


def get_step(name: str) -> Callable[..., None]:
    """The PTQ step registered as ``name``."""
    return STEPS.get(name)


def list_steps() -> List[str]:
    """The registered PTQ steps, sorted."""
    return STEPS.names()


@register_step("calibrate")
def calibrate_step(ctx: PTQContext, sequential: bool = False, num_images: Optional[int] = None) -> None:
    """Calibrate every uncalibrated quantizer on the calibration images (the first ``num_images`` of them when
    given: I&S-ViT initialises its quantizers on 64 of its 1024 images)."""
    data = ctx.calib_data
    if num_images is not None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"calibrate: num_images must be a positive integer, got {num_images!r}")
        data = data[:num_images]
    calibrate(ctx.model, data, sequential=sequential, batch_size=ctx.batch_size, progress=ctx.progress)
