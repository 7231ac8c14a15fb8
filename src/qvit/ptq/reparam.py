"""RepQ-ViT's scale reparameterization: channel-wise post-LayerNorm activations become per-tensor ones.

For a LayerNorm ``X = γ ⊙ norm(x) + β`` (``C`` channels) that feeds a linear layer ``Y = X Wᵀ + b``
(``W``: ``[out, C]``) whose input quantizer is channel-wise with scales ``s`` and zero-points ``z``
(both ``[C]``)::

    s̃ = target(s)                      # mean (RepQ-ViT) or median (DopQ-ViT's MOSF, qvit's reading)
    z̃ = mean(z)                        # not rounded unless round_zero_point
    r = s / s̃
    b_vec = -z ⊙ s / r + z̃ s̃
    γ' = γ / r,   β' = β / r - b_vec
    W' = W diag(r),   b' = b + W' b_vec  (a bias is created if the layer has none)

The LayerNorm now outputs ``X' = X / r - b_vec`` and ``W' X' + b' = W X + b``, so the float network is
unchanged. Quantizing ``X'`` per tensor with ``(s̃, z̃)`` gives the codes ``round(X / s + z - z̃) + z̃``: the
channel-wise quantization of ``X`` with ``(s, z)`` when ``z̃`` is an integer, shifted by the fractional part of
``z - z̃`` otherwise (RepQ-ViT keeps ``z̃`` fractional; ``round_zero_point`` makes it exact and integer-codable).
The linear layer's weight quantizer is reset and re-calibrated on ``W'``.

State dicts: the step turns the input quantizer's granularity into ``tensor`` (``[1]``-shaped ``scale`` and
``zero_point``) and may add ``bias`` to linear layers that had none (Swin's ``reduction``). It also adds one
``overrides`` entry ``{"<linear>.input": {"granularity": "tensor"}}`` per folded layer to the model's config
(``quant_state(model).config``), so ``prepare(float_model, quant_state(model).config)`` builds matching quantizers. To load such a state dict into a
model freshly prepared with the *recipe's* config (channel-wise sites), call
:func:`match_reparameterized_state` first: it adapts the model to the state dict, then
``model.load_state_dict(state_dict)`` loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block as VitBlock

from ..quantizers import Quantizer
from ..calibration import calibrate
from .steps import PTQContext, register_step

TARGETS = ("mean", "median")


@dataclass
class PostLNPair:
    """A LayerNorm and the linear layer that consumes its output (and nothing else does)."""

    norm_name: str
    linear_name: str
    norm: nn.LayerNorm
    linear: nn.Linear


@dataclass
class ReparamResult:
    """What :func:`reparameterize_post_ln` did: folded linear layers and skipped ones with the reason."""

    layers: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s own (the wiring this file relies on)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _swin_pads_windows(block: SwinTransformerBlock) -> bool:
    """True when the block zero-pads its normalized input to whole windows (resolution % window != 0)."""
    res, win = tuple(block.input_resolution), tuple(block.window_size)
    return any(r % w for r, w in zip(res, win))


def find_post_ln_pairs(model: nn.Module, *, patch_merging: bool = True,
                       skipped: Optional[Dict[str, str]] = None) -> List[PostLNPair]:
    """LayerNorm -> linear pairs of timm's ViT/DeiT ``Block``, Swin ``SwinTransformerBlock`` and ``PatchMerging``.

    ViT and Swin blocks give ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``; ``PatchMerging`` (when
    ``patch_merging``) gives ``norm -> reduction``, whose input is ``[B, H, W, 4C]`` (channels last). Pairs that
    cannot be folded exactly are left out and, when ``skipped`` is given, recorded there by linear name:
    LayerNorms without affine weight and bias, attention with a gate (the LayerNorm output feeds it too),
    and Swin blocks that zero-pad the normalized input to whole windows (the padding is not reparameterized).
    """
    skipped = {} if skipped is None else skipped
    candidates: List[Tuple[str, nn.Module, str, Optional[nn.Module], str]] = []
    for name, module in model.named_modules():
        if _plain(module, VitBlock) or _plain(module, SwinTransformerBlock):
            attn = getattr(module, "attn", None)
            reason = ""
            if getattr(attn, "gate", None) is not None:
                reason = "attention has a gate that also reads the LayerNorm output"
            elif isinstance(module, SwinTransformerBlock) and _swin_pads_windows(module):
                reason = "window padding inserts zeros after the LayerNorm"
            candidates.append((_join(name, "norm1"), module.norm1, _join(name, "attn.qkv"),
                               getattr(attn, "qkv", None), reason))
            candidates.append((_join(name, "norm2"), module.norm2, _join(name, "mlp.fc1"),
                               getattr(getattr(module, "mlp", None), "fc1", None), ""))
        elif patch_merging and _plain(module, PatchMerging):
            candidates.append((_join(name, "norm"), module.norm, _join(name, "reduction"), module.reduction, ""))
    pairs = []
    for norm_name, norm, linear_name, linear, reason in candidates:
        if not isinstance(linear, nn.Linear) or not isinstance(norm, nn.LayerNorm):
            continue  # another block layout (SwiGLU MLP, conv MLP, RMSNorm ...): nothing to fold
        if not reason and (norm.weight is None or norm.bias is None):
            reason = "LayerNorm has no affine weight and bias"
        if not reason and (len(norm.normalized_shape) != 1 or norm.normalized_shape[0] != linear.in_features):
            reason = "LayerNorm width does not match the linear layer's input"
        if reason:
            skipped[linear_name] = reason
            continue
        pairs.append(PostLNPair(norm_name, linear_name, norm, linear))
    return pairs


def target_scale(scale: torch.Tensor, target: str = "mean") -> torch.Tensor:
    """The per-tensor scale ``s̃`` (0-d) that replaces the channel-wise scales ``scale`` (``[C]``).

    ``mean``: RepQ-ViT. ``median``: DopQ-ViT's MOSF as read by qvit (the paper's method section was not
    available): the value minimising the mean absolute deviation ``Σ_c |s_c - s̃|``, i.e. the median; for an
    even ``C`` every value between the two middle scales does, and qvit takes their midpoint.
    """
    if target == "mean":
        return scale.mean()
    if target == "median":
        return torch.quantile(scale, 0.5)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


@torch.no_grad()
def reparameterize_pair(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor, zero_point: torch.Tensor, *,
                        target: str = "mean", round_zero_point: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold channel-wise input scales into ``norm`` and ``linear`` in place; return ``(s̃, z̃)`` (0-d tensors).

    Args:
        norm: LayerNorm over ``C`` channels with affine weight ``γ`` and bias ``β`` (``[C]``).
        linear: its consumer, weight ``W`` ``[out, C]`` and bias ``b`` ``[out]`` (created when absent).
        scale: channel-wise scales ``s`` ``[C]``, all positive.
        zero_point: channel-wise zero-points ``z`` ``[C]``.
        target: ``mean`` or ``median`` (see :func:`target_scale`).
        round_zero_point: round ``z̃ = mean(z)`` to an integer (integer hardware); RepQ-ViT keeps it fractional.

    The arithmetic is done in float64; the float function ``linear(norm(x))`` is unchanged.
    """
    s = scale.detach().double().reshape(-1)
    z = zero_point.detach().double().reshape(-1)
    c = linear.in_features
    if s.numel() != c or z.numel() != c:
        raise ValueError(f"expected {c} channel scales and zero-points, got {s.numel()} and {z.numel()}")
    if not bool((s > 0).all()):
        raise ValueError("channel scales must be positive")
    s_t = target_scale(s, target)
    z_t = z.mean()
    if round_zero_point:
        z_t = torch.round(z_t)
    r = s / s_t
    b_vec = -z * s / r + z_t * s_t
    gamma, beta = norm.weight.double(), norm.bias.double()
    w = linear.weight.double() * r
    b = linear.bias.double() if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.float64,
                                                                          device=w.device)
    b = b + w @ b_vec
    norm.weight.copy_(gamma / r)
    norm.bias.copy_(beta / r - b_vec)
    linear.weight.copy_(w)
    if linear.bias is None:
        linear.bias = nn.Parameter(b.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(b)
    return s_t.float(), z_t.float()


def set_per_tensor(quantizer: Quantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Turn a calibrated uniform quantizer into a per-tensor one with ``scale`` and ``zero_point`` (one value each).

    Granularity and the ``[columns]`` buffers change together, so ``state_dict`` holds ``[1]``-shaped tensors.
    """
    quantizer.granularity = "tensor"
    quantizer.discard_observations()
    quantizer.set_params(scale.reshape(1), zero_point.reshape(1))
    quantizer.check_params()


def _foldable_input(linear: nn.Module) -> Tuple[Optional[Quantizer], str]:
    """The linear layer's input quantizer if it is channel-wise uniform on the last axis, else a reason."""
    q = getattr(linear, "input_quantizer", None)
    if q is None:
        return None, "input is not quantized"
    if q.kind != "uniform":
        return None, f"input quantizer is {q.kind!r}, not uniform"
    if q.granularity != "channel":
        return None, f"input quantizer is {q.granularity}-wise, not channel-wise"
    if q.axis != -1:
        return None, f"input quantizer's channel axis is {q.axis}, not -1"
    return q, ""


def _record_per_tensor(model: nn.Module, sites: List[str]) -> None:
    """Add ``{"granularity": "tensor"}`` overrides for ``sites`` to the model's config (its :class:`QuantState`)."""
    state = getattr(model, "qvit_state", None)
    if state is None or not sites:
        return
    state.config = state.config.merged({"overrides": {site: {"granularity": "tensor"} for site in sites}})


def reparameterize_post_ln(model: nn.Module, *, target: str = "mean", round_zero_point: bool = False,
                           patch_merging: bool = True, recalibrate_weights: bool = True) -> ReparamResult:
    """Apply the reparameterization to every post-LayerNorm linear layer whose input quantizer is channel-wise.

    The input quantizers must be calibrated. Each folded layer's input quantizer becomes per-tensor with
    ``(s̃, z̃)``; its weight quantizer is reset and, with ``recalibrate_weights``, re-calibrated on ``W'``
    (otherwise a later ``calibrate`` step does it). Other quantizers are left as they are (RepQ-ViT).
    ``patch_merging=False`` leaves Swin's ``reduction`` channel-wise (I&S-ViT's stage 2).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    result = ReparamResult()
    for pair in find_post_ln_pairs(model, patch_merging=patch_merging, skipped=result.skipped):
        q, reason = _foldable_input(pair.linear)
        if q is None:
            result.skipped[pair.linear_name] = reason
            continue
        if not bool(q.calibrated):
            raise RuntimeError(f"{pair.linear_name}.input is not calibrated: calibrate before reparameterizing")
        s_t, z_t = reparameterize_pair(pair.norm, pair.linear, q.scale, q.zero_point, target=target,
                                       round_zero_point=round_zero_point)
        set_per_tensor(q, s_t, z_t)
        wq = getattr(pair.linear, "weight_quantizer", None)
        if wq is not None:
            wq.reset()
        result.layers.append(pair.linear_name)
    _record_per_tensor(model, [f"{name}.input" for name in result.layers])
    if recalibrate_weights and result.layers:
        calibrate(model, (), weights_only=True, progress=False)
    return result


def match_reparameterized_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                                patch_merging: bool = True) -> List[str]:
    """Adapt a prepared model to a reparameterized ``state_dict`` before ``load_state_dict``; return the folded layers.

    For every LayerNorm -> linear pair (see :func:`find_post_ln_pairs`): a bias the state dict has and the layer
    lacks is created (zeros, then loaded), and a channel-wise input quantizer whose saved ``scale`` has one
    element becomes per-tensor. Layers already in that form are left alone, so calling it twice is harmless.
    """
    changed, per_tensor = [], []
    for pair in find_post_ln_pairs(model, patch_merging=patch_merging):
        lin, name = pair.linear, pair.linear_name
        touched = False
        if lin.bias is None and f"{name}.bias" in state_dict:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                    requires_grad=lin.weight.requires_grad)
            touched = True
        q, _ = _foldable_input(lin)
        saved = state_dict.get(f"{name}.input_quantizer.scale")
        zero = state_dict.get(f"{name}.input_quantizer.zero_point")
        if q is not None and saved is not None and zero is not None and saved.numel() == 1 < lin.in_features:
            set_per_tensor(q, saved.float(), zero.float())
            per_tensor.append(f"{name}.input")
            touched = True
        if touched:
            changed.append(name)
    _record_per_tensor(model, per_tensor)
    return changed


@register_step("reparameterize_post_ln")
def reparameterize_post_ln_step(ctx: PTQContext, target: str = "mean", round_zero_point: bool = False,
                                patch_merging: bool = True, recalibrate_weights: bool = True) -> None:
    """Recipe step: :func:`reparameterize_post_ln` on the prepared model; logs the folded and skipped layers."""
    result = reparameterize_post_ln(ctx.model, target=target, round_zero_point=round_zero_point,
                                    patch_merging=patch_merging, recalibrate_weights=recalibrate_weights)
    record: Dict[str, Any] = {"step": "reparameterize_post_ln", "target": target,
                              "reparameterized": len(result.layers), "layers": result.layers,
                              "skipped": result.skipped}
    ctx.log.append(record)
