"""Checks shared by the post-softmax (companding / logarithmic) quantizer families."""
from __future__ import annotations

from typing import Optional

import torch


def unsigned_only(name: str, signed: Optional[bool]) -> bool:
    """Post-softmax quantizers are unsigned: return ``False`` or raise for ``signed=True``."""
    if signed:
        raise ValueError(f"{name} quantizes non-negative (post-softmax) inputs: signed must be False or None, "
                         f"got {signed!r}")
    return False


def check_nonnegative(name: str, cols: torch.Tensor) -> None:
    """Raise ``ValueError`` if calibration data ``cols`` holds negative values."""
    if bool((cols < 0).any()):
        raise ValueError(f"{name} expects non-negative (post-softmax) inputs; calibration data has minimum "
                         f"{float(cols.min()):.4g}")
