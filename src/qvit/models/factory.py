"""Build the float model a command works on: the reference model or any timm model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import timm
import torch.nn as nn

from .reference import REFERENCE_MODEL


class WeightsUnavailableError(RuntimeError):
    """Published weights were asked for but could not be fetched (e.g. offline)."""


def build_model(name: str = REFERENCE_MODEL, *, checkpoint: Optional[os.PathLike] = None, pretrained: bool = False,
                num_classes: Optional[int] = None) -> nn.Module:
    """A float timm model in eval mode.

    ``checkpoint``: local weights (``.pth``/``.pt``/``.safetensors``, a plain state_dict or one under
    ``state_dict``/``model``); ``pretrained``: timm's published weights (needs network access). The
    reference model loads its shipped weights unless a checkpoint is given.
    """
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return timm.create_model(name, pretrained=False, checkpoint_path=str(path), **kwargs).eval()
    if name == REFERENCE_MODEL:
        return timm.create_model(name, pretrained=True, **kwargs).eval()
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs).eval()
    except Exception as err:
        if pretrained:
            raise WeightsUnavailableError(f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}); "
                               "offline, pass local weights with --checkpoint FILE") from err
        raise
