"""Role names of quantized sites: what a layer *is* in its network (``qkv``, ``fc2``, ``stem`` ...)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn as nn

from ..nn import QuantAttention, QuantWindowAttention, quant_class_for

#: Leaf names whose role is the name itself (ViT/DeiT/Swin blocks, Swin patch merging).
NAMED_ROLES = ("qkv", "proj", "fc1", "fc2", "reduction", "q", "k", "v")


def stem_and_head(model: nn.Module) -> Tuple[Optional[str], Tuple[str, ...]]:
    """Module names of the first layer and of the classifier(s), from timm's ``pretrained_cfg``.

    Falls back to the first conv/linear layer and the last linear layer when the model has no
    ``pretrained_cfg``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    stem = cfg.get("first_conv")
    heads = cfg.get("classifier")
    names = dict(model.named_modules())
    if isinstance(stem, (list, tuple)):
        stem = stem[0] if stem else None
    if stem is not None and not isinstance(names.get(stem), (nn.Conv2d, nn.Linear)):
        stem = None
    if isinstance(heads, str):
        heads = (heads,)
    heads = tuple(h for h in (heads or ()) if h in names)
    # timm's classifier entry may name a wrapper (e.g. Swin's ``head`` holds ``head.fc``).
    heads = tuple(h if isinstance(names[h], nn.Linear) else f"{h}.fc" for h in heads
                  if isinstance(names[h], nn.Linear) or isinstance(names.get(f"{h}.fc"), nn.Linear))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if stem is None and layers:
        stem = layers[0]
    if not heads and not cfg.get("classifier"):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        heads = (linears[-1],) if linears else ()
    return stem, heads


def role_prefix(name: str, module: nn.Module, stem: Optional[str], heads: Sequence[str]) -> str:
    """The role prefix of a quantizable module; slots append ``.input``/``.weight``/``.probs`` ..."""
    if quant_class_for(module) in (QuantAttention, QuantWindowAttention):
        return "attn"
    if name == stem:
        return "stem"
    if name in heads:
        return "head"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Linear):
        return leaf if leaf in NAMED_ROLES else "linear"
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return "dwconv" if depthwise else "conv"
    return leaf

