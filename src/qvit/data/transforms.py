"""Eval transforms: timm's, resolved from the model's pretrained config, for any input image mode."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch.nn as nn
from timm.data import create_transform, resolve_data_config


def model_data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config (input size, mean/std, interpolation, crop) for ``model``."""
    return resolve_data_config({}, model=model)


class ToMode:
    """Convert a PIL image to ``L`` (1 channel) or ``RGB`` (3 channels) to match the model's input."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"only 1- or 3-channel models are supported, got {channels}")
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode})"


def create_eval_transform(model: nn.Module) -> Callable:
    """The eval transform for ``model``: image mode to its channel count, then timm's resize/crop/normalize."""
    cfg = model_data_config(model)
    from torchvision import transforms as T

    timm_tf = create_transform(**cfg, is_training=False)
    return T.Compose([ToMode(cfg["input_size"][0]), timm_tf])
