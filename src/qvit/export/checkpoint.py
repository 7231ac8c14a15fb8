"""Packed low-bit checkpoints: ``save_quantized`` / ``load_quantized``.

A packed checkpoint is one safetensors file. Every weight whose quantizer yields integer codes is stored as those
codes bit-packed at the quantizer's bit-width (``<module>.weight.packed``, ``uint8``); everything else of the
quantized model's ``state_dict`` (biases, norms, float layers, every quantizer's scales and zero-points) is stored
as it is, except that tensors of at most ``INLINE_NUMEL`` elements and all-zero tensors are written into the
metadata (``inline``) to keep small files small. The metadata ``qvit_packed`` (JSON, zlib-compressed and base64-encoded: the
per-module descriptions repeat, and compressed they cost a few kilobytes instead of tens) holds the format version, the timm architecture, each quantized
module's quantizer kinds and settings, the packed tensors' shapes and code offsets, the float tensors' shapes (to
reject a file written for another model) and the recipe.

Loading turns that description into a :class:`~qvit.QuantConfig` (the stored transforms, one override per site
pinning its quantizer), builds the quantized modules with ``prepare`` like any other quantized model, loads the state, and sets each packed weight to the
dequantized codes, ``dequantize(quantize(W)) == fake_quant(W)``. The weight then lies on its grid: a uniform
quantizer, which maps its grid points to themselves, stays on; any other weight quantizer is switched off
(``enabled = False``), since it may recompute its parameters from the tensor (StatsQ). The loaded model therefore computes exactly
what the fake-quantized model computed.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import QuantConfig
from ..models.prepare import prepare
from ..models.state import QuantState, quant_state
from ..nn import QuantModule
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "qvit-packed"
VERSION = 2
#: versions this qvit reads (1 stored the same metadata as plain JSON)
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "qvit_packed"
#: prefix of the compressed metadata encoding (plain JSON starts with ``{``)
_ZLIB_PREFIX = "zlib:"
PACKED_SUFFIX = ".packed"
#: tensors with at most this many elements are stored in the metadata rather than as tensors
INLINE_NUMEL = 4


class PackedCheckpointError(ValueError):
    """A packed checkpoint cannot be read, or does not fit the model it is loaded into."""


def _architecture(model: nn.Module) -> Tuple[Optional[str], Dict[str, Any]]:
    """timm name and the constructor arguments that set the model's shape (classes, input channels)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    kwargs: Dict[str, Any] = {}
    if hasattr(model, "num_classes"):
        kwargs["num_classes"] = int(model.num_classes)
    first = cfg.get("first_conv")
    if first:
        conv = model.get_submodule(first) if first in dict(model.named_modules()) else None
        if conv is not None and hasattr(conv, "in_channels"):
            kwargs["in_chans"] = int(conv.in_channels)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:                       # ViT/Swin position tables depend on the input size
        kwargs["img_size"] = list(img_size)
    return name, kwargs


def _float_keys(model: nn.Module) -> Dict[str, list]:
    return {k: list(v.shape) for k, v in model.state_dict().items() if "_quantizer." not in k}


def _quantizer_config(q) -> Optional[Dict[str, Any]]:
    return None if q is None else q.config()


def encode_metadata(meta: Mapping[str, Any]) -> str:
    """The ``qvit_packed`` metadata string for ``meta``: compact JSON, zlib-compressed, base64-encoded."""
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return _ZLIB_PREFIX + base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def _decode_metadata(raw: str) -> Dict[str, Any]:
    """Inverse of ``encode_metadata``; plain JSON (version 1 files) is read as it is."""
    if raw.startswith(_ZLIB_PREFIX):
        raw = zlib.decompress(base64.b64decode(raw[len(_ZLIB_PREFIX):], validate=True)).decode()
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("the metadata is not a JSON object")
    return meta


def save_quantized(model: nn.Module, path: os.PathLike, *, recipe: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the prepared, calibrated ``model`` as a packed checkpoint at ``path``; returns the path.

    ``recipe`` (e.g. ``{"name": "repq", "w_bits": 4, "a_bits": 4}``) is stored as metadata; by default the name and
    version of the recipe that quantized the model (its :class:`~qvit.models.QuantState`) are stored.
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    if not modules:
        raise ValueError("save_quantized: the model has no quantized modules (run qvit.prepare and calibrate first)")
    for name, q in ((f"{n}.{s}", q) for n, m in modules.items() for s, q in m.quantizers()):
        if q.enabled and not bool(q.calibrated):
            raise ValueError(f"save_quantized: quantizer {name} was never calibrated")
    arch, kwargs = _architecture(model)
    keep_float = {f"{n}.{child}" if n else child for n, m in modules.items() for child in m.float_weights_read()}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # training-time state hung on quantizers (oscillation trackers) is not part of the deployable model
    training_state = tuple(f"{n}.{slot}_quantizer.{child}." if n else f"{slot}_quantizer.{child}."
                           for n, m in modules.items() for slot, q in m.quantizers() for child, _ in q.named_children())
    state = {k: v for k, v in state.items() if not k.startswith(training_state)}
    tensors: Dict[str, torch.Tensor] = {}
    packed: Dict[str, Dict[str, Any]] = {}
    described: Dict[str, Dict[str, Any]] = {}
    for name, m in modules.items():
        slots = {slot: _quantizer_config(getattr(m, f"{slot}_quantizer", None)) for slot, _ in m.slots()}
        described[name] = {"class": type(m).__name__, "slots": slots,
                           "flags": {f: getattr(m, f) for f in m.quant_flags if hasattr(m, f)}}
        for slot, is_weight in m.slots():
            q = getattr(m, f"{slot}_quantizer", None)
            key = f"{name}.{slot}" if name else slot
            if not is_weight or q is None or not q.enabled or name in keep_float or key not in state:
                continue
            try:
                codes = q.quantize(getattr(m, slot).detach())
            except ValueError:
                continue                     # no integer codes (e.g. a fractional zero-point): stays float
            qmin, _ = q.code_range()
            tensors[key + PACKED_SUFFIX] = pack_codes(codes, q.bits, qmin)
            packed[key] = {"bits": q.bits, "offset": qmin, "shape": list(codes.shape), "kind": q.kind}
            # quantize() may refresh data-dependent parameters (StatsQ's scale): store them as of the codes
            state.update({f"{name}.{slot}_quantizer.{k}": v.detach() for k, v in
                          list(q.named_parameters(recurse=False)) + list(q.named_buffers(recurse=False))})
    inline: Dict[str, Any] = {}
    for k, v in state.items():
        if k in packed:
            continue
        v = v.contiguous().cpu()
        if v.numel() <= INLINE_NUMEL or not bool(v.any()):
            # tiny tensors (flags, per-tensor scales) and all-zero ones (symmetric zero-points) live in the metadata
            inline[k] = {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                         "values": None if v.numel() > INLINE_NUMEL else v.reshape(-1).tolist()}
        else:
            tensors[k] = v
    qstate = quant_state(model) if hasattr(model, "qvit_state") else QuantState(None)
    r = qstate.recipe
    recipe_meta = dict(recipe) if recipe is not None else (
        {"name": r.name, "version": r.version} if r is not None else None)
    from .. import __version__
    transforms = list(qstate.config.transforms) if qstate.config is not None else []
    meta = {"format": FORMAT, "version": VERSION, "qvit": __version__, "architecture": arch, "model_kwargs": kwargs,
            "recipe": recipe_meta, "transforms": transforms, "modules": described, "packed": packed, "inline": inline,
            "float_tensors": _float_keys(model)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: encode_metadata(meta)})
    os.replace(tmp, path)
    return path


def read_metadata(path: os.PathLike) -> Dict[str, Any]:
    """The ``qvit_packed`` metadata of a packed checkpoint (validated format and version)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise PackedCheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if raw is None:
        raise PackedCheckpointError(f"{path} is a safetensors file but not a qvit packed checkpoint "
                                    f"(no {METADATA_KEY!r} metadata)")
    try:
        meta = _decode_metadata(raw)
    except (ValueError, zlib.error) as err:   # ValueError: JSON, base64 and UTF-8 errors
        raise PackedCheckpointError(f"{path}: corrupt {METADATA_KEY!r} metadata ({err})") from None
    if meta.get("format") != FORMAT:
        raise PackedCheckpointError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise PackedCheckpointError(f"{path}: packed checkpoint version {meta.get('version')!r} is not supported "
                                    f"(this qvit reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return meta


def _read_tensors(path: Path, meta: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PackedCheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None
    for key, info in meta.get("inline", {}).items():
        try:
            dtype = getattr(torch, info["dtype"])
            if info["values"] is None:
                tensors[key] = torch.zeros(info["shape"], dtype=dtype)
            else:
                tensors[key] = torch.tensor(info["values"], dtype=dtype).reshape(info["shape"])
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as err:
            raise PackedCheckpointError(f"{path}: corrupt inline tensor {key!r} ({err})") from None
    for key, info in meta["packed"].items():
        blob = tensors.get(key + PACKED_SUFFIX)
        if blob is None or blob.numel() != packed_nbytes(math.prod(info["shape"]), info["bits"]):
            raise PackedCheckpointError(f"{path}: packed tensor {key} is missing or has the wrong size")
    return tensors


def _check_fits(path: Path, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Raise if the float ``model`` is not the architecture the file was written for."""
    saved = meta["float_tensors"]
    arch = meta.get("architecture")
    current = _float_keys(model)
    for key, shape in current.items():
        if key not in saved:
            raise PackedCheckpointError(f"{path} was written for another model ({arch}): it has no tensor {key!r}")
        if list(saved[key]) != shape:
            raise PackedCheckpointError(f"{path} was written for another model ({arch}): {key} has shape "
                                        f"{tuple(saved[key])} there and {tuple(shape)} here")
    for key in saved:
        if key not in current and not key.endswith(".bias"):
            raise PackedCheckpointError(f"{path} was written for another model ({arch}): this model has no {key!r}")


def _config_from_description(meta: Mapping[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` that ``prepare`` turns into the quantized modules the file describes: the file's
    transforms, and one override per site pinning the quantizer it stored (``enabled: false`` for float sites)."""
    modules = meta["modules"]
    transforms = meta.get("transforms")
    if transforms is None:                       # files written before transforms were stored
        qkr = any(info.get("flags", {}).get("qkr") for info in modules.values())
        transforms = ["query_key_reparameterization"] if qkr else []
    overrides: Dict[str, Dict[str, Any]] = {}
    for name, info in modules.items():
        for slot, cfg in info["slots"].items():
            site = f"{name}.{slot}" if name else slot
            overrides[site] = {"enabled": False} if cfg is None else {
                **{k: v for k, v in cfg.items() if k != "lazy_init"}, "enabled": True}
    return QuantConfig(transforms=list(transforms), overrides=overrides)


def _rebuild(model: nn.Module, meta: Mapping[str, Any], path: Path) -> QuantConfig:
    """``prepare`` the float ``model`` (which must already fit the file) into the quantized modules the file
    describes; returns the config used."""
    try:
        config = _config_from_description(meta)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise PackedCheckpointError(f"{path}: corrupt module description ({err})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # prepare's notes were shown when the model was quantized
        try:
            prepare(model, config)
        except ValueError as err:
            raise PackedCheckpointError(f"{path}: the described quantizers cannot be built ({err})") from None
    built = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    described = meta["modules"]
    if set(built) != set(described):
        extra, missing = sorted(set(built) - set(described)), sorted(set(described) - set(built))
        raise PackedCheckpointError(f"{path} does not describe this model's quantized modules (not in the file: "
                                    f"{extra[:4]}; not in the model: {missing[:4]})")
    for name, module in built.items():
        info = described[name]
        if type(module).__name__ != info["class"]:
            raise PackedCheckpointError(f"{path}: module {name!r} quantizes as {type(module).__name__} here and as "
                                        f"{info['class']} in the file")
        for flag, value in info.get("flags", {}).items():
            if getattr(module, flag, value) != value:
                raise PackedCheckpointError(f"{path}: module {name!r} has {flag}={getattr(module, flag)!r} here and "
                                            f"{value!r} in the file")
    return config


def _removed_site(model: nn.Module, key: str) -> bool:
    """Whether state key ``key`` (``<module>.<slot>_quantizer.<...>``) belongs to a slot whose quantizer is None."""
    owner, _, rest = key.partition("_quantizer.")
    module_name, _, slot = owner.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return isinstance(module, QuantModule) and getattr(module, f"{slot}_quantizer", 0) is None


def load_quantized(path: os.PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the quantized model stored by :func:`save_quantized` (eval mode).

    ``model``: a float model of the same architecture to start from (it is copied, never modified); by default
    the timm architecture named in the file is created without weights. Raises :class:`PackedCheckpointError`
    for a file that is truncated, corrupt, of another format version, or written for another model.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path, meta)
    if model is None:
        arch = meta.get("architecture")
        if not arch:
            raise PackedCheckpointError(f"{path} does not name its timm architecture; pass the float model")
        model = timm.create_model(arch, pretrained=False, **meta.get("model_kwargs", {}))
    else:
        if any(isinstance(m, QuantModule) for m in model.modules()):
            raise ValueError("load_quantized: pass the float model (not a prepared one)")
        model = copy.deepcopy(model)
    _check_fits(path, model, meta)
    config = _rebuild(model, meta, path)
    existing = model.state_dict()
    for key in tensors:                          # biases the recipe added (RepQ-ViT on Swin's reduction)
        owner, _, leaf = key.rpartition(".")
        if leaf == "bias" and key not in existing:
            mod = model.get_submodule(owner)
            if isinstance(mod, nn.Linear) and mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros_like(tensors[key]))
    current = model.state_dict()
    # quantizer state of sites a transform removed (files written when QKR kept unused q and k quantizers)
    state = {k: v for k, v in tensors.items() if not k.endswith(PACKED_SUFFIX)
             and (k in current or "_quantizer." not in k or not _removed_site(model, k))}
    for key in meta["packed"]:
        state[key] = current[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PackedCheckpointError(f"{path} does not fit the rebuilt model: {str(err)[:600]}") from None
    for key, info in meta["packed"].items():
        owner, _, slot = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        q = getattr(module, f"{slot}_quantizer")
        codes = unpack_codes(tensors[key + PACKED_SUFFIX], info["bits"], math.prod(info["shape"]),
                             info["offset"]).view(info["shape"])
        lo, hi = q.code_range()
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise PackedCheckpointError(f"{path}: codes of {key} fall outside the quantizer's range [{lo}, {hi}]")
        with torch.no_grad():
            weight = getattr(module, slot)
            weight.copy_(q.dequantize(codes).to(weight.dtype))
            # a uniform grid maps its own points to themselves, so its quantizer stays on (ONNX export then stores
            # integer weights); other families may recompute parameters from the tensor, so they are switched off
            q.enabled = q.affine_form() is not None and torch.equal(q.fake_quant(weight), weight)
    model.qvit_state = QuantState(config, packed={k: meta[k] for k in ("architecture", "recipe", "qvit")})
    return model.eval()
