"""The reference FP model: a DeiT-Tiny-shaped ViT for 28x28 grayscale Fashion-MNIST.

It is a plain timm ``VisionTransformer`` (embed 192, 3 heads, MLP ratio 4, patch 4, depth 4), registered
with timm as ``qvit_vit_tiny_fmnist`` so that every qvit path treats it like any other timm model. Its
trained weights ship in ``qvit/assets``; ``scripts/train_reference.py`` rebuilds them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..runtime import get_settings

REFERENCE_MODEL = "qvit_vit_tiny_fmnist"
WEIGHTS_NAME = "qvit_vit_tiny_fmnist.safetensors"
ARCH: Dict[str, Any] = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10,
    embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
)
PRETRAINED_CFG: Dict[str, Any] = dict(
    input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), num_classes=10,
    interpolation="bilinear", crop_pct=1.0, crop_mode="center",
    first_conv="patch_embed.proj", classifier="head",
)


def _cache_dir() -> Path:
    return get_settings().cache_dir


def reference_weights_path() -> Optional[Path]:
    """Where the reference weights are: the packaged asset, else the user cache; None if neither exists."""
    for folder in (Path(__file__).resolve().parent.parent / "assets", _cache_dir()):
        path = folder / WEIGHTS_NAME
        if path.is_file():
            return path
    return None


def reference_weights_id() -> Optional[str]:
    """The first 16 hex digits of the reference weights file's SHA-256 (None when there are no weights)."""
    path = reference_weights_path()
    if path is None:
        return None
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_weights_metadata(path: Path) -> Dict[str, Any]:
    """The training metadata ``scripts/train_reference.py`` stores in a safetensors file ({} if none)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("qvit", "{}"))


def reference_weights_metadata() -> Dict[str, Any]:
    """The training metadata stored beside the weights (test top-1, epochs, seed, command)."""
    path = reference_weights_path()
    return {} if path is None else read_weights_metadata(path)


@register_model
def qvit_vit_tiny_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny-shaped ViT for 28x28 grayscale input; ``pretrained=True`` loads qvit's shipped weights."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = {**ARCH, **kwargs}
    model = VisionTransformer(**args)
    model.pretrained_cfg = dict(PRETRAINED_CFG, architecture=REFERENCE_MODEL)
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        path = reference_weights_path()
        if path is None:
            raise FileNotFoundError(
                f"No reference weights '{WEIGHTS_NAME}' in the package or in {_cache_dir()}. "
                "Build them with: python scripts/train_reference.py")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(path)))
    return model


def create_reference_model(pretrained: bool = True) -> VisionTransformer:
    """Build the reference model (with its trained weights by default)."""
    return timm.create_model(REFERENCE_MODEL, pretrained=pretrained)
