"""``prepare``: swap every quantizable module of a timm model for its quantized class."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple, Union

import torch.nn as nn

from ..config import QuantConfig
from ..nn import QuantModule, WeightSite, quant_class_for
from ..quantizers import Quantizer
from .roles import role_prefix, stem_and_head
from .state import ATTRIBUTE, QuantState
from .transforms import apply_transforms

ConfigLike = Union[QuantConfig, Mapping[str, Any], str, None]


def prepare(model: nn.Module, config: ConfigLike = None, *, inplace: bool = True) -> nn.Module:
    """Quantize ``model``'s sites per ``config`` (a QuantConfig, mapping, YAML path, or None for W8A8).

    Every module whose class has a registered quantized class (``nn.Linear``, ``nn.Conv2d``, timm's
    ``Attention`` and ``Mlp``, Swin's ``WindowAttention``) has its class swapped in place; parameters are shared,
    so the float ``state_dict`` keys are unchanged and quantizer state is added under
    ``<module>.<slot>_quantizer.*``. Then ``config.transforms`` are applied in order
    (:mod:`qvit.models.transforms`). Quantizers start uncalibrated: run :func:`qvit.calibrate` next.
    """
    config = QuantConfig.coerce(config)
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("model is already prepared; call qvit.unprepare(model) first to re-prepare it")
    stem, heads = stem_and_head(model)
    sites: List[str] = []
    for name, module in list(model.named_modules()):
        qcls = quant_class_for(module)
        if qcls is None:
            if type(module).__name__.endswith("Attention") and not isinstance(module, QuantModule):
                warnings.warn(f"{name} ({type(module).__name__}) is not rewritten: its q·kᵀ, softmax and probs·v "
                              "stay in floating point (its linear layers are quantized)")
            continue
        prefix = role_prefix(name, module, stem, heads)
        specs, roles = {}, {}
        for slot, is_weight in qcls.quant_slots:
            roles[slot] = f"{prefix}.{slot}"
            site = f"{name}.{slot}" if name else slot
            sites.append(site)
            specs[slot] = config.spec_for(site, roles[slot], is_weight)
        qcls.convert(module, specs, name=name, roles=roles)
    sites.extend(apply_transforms(model, config))
    for pattern in config.overrides:
        if not any(fnmatch.fnmatchcase(site, pattern) for site in sites):
            warnings.warn(f"QuantConfig override {pattern!r} matches no site of this model")
    model.qvit_state = QuantState(config)
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Turn every quantized module back into its float class, dropping the quantizers."""
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.restore_float()
    if hasattr(model, ATTRIBUTE):
        delattr(model, ATTRIBUTE)
    return model


def iter_quantizers(model: nn.Module) -> Iterator[Tuple[str, str, Quantizer]]:
    """``(site, role, quantizer)`` for every enabled site of a prepared model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            for slot, q in module.quantizers():
                yield (f"{name}.{slot}" if name else slot), module.quant_roles.get(slot, slot), q


def iter_weight_sites(model: nn.Module) -> Iterator[WeightSite]:
    """Every enabled weight site of a prepared model (:class:`~qvit.nn.WeightSite`), in module order; a site that a
    module reports for one of its children (QKR's value rows of ``qkv``) replaces the child's own report."""
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            for site in module.weight_sites(name):
                if site.site not in seen:
                    seen.add(site.site)
                    yield site


@dataclass
class SiteInfo:
    """One row of :func:`describe`."""

    site: str
    role: str
    kind: str
    bits: Optional[int]
    granularity: str
    calibrated: bool

    def as_row(self) -> List[str]:
        return [self.site, self.role, self.kind, "fp" if self.bits is None else str(self.bits), self.granularity,
                "yes" if self.calibrated else "no"]


def describe(model: nn.Module, include_float: bool = True) -> List[SiteInfo]:
    """Every site of a prepared model with its role, quantizer kind, bits, granularity and state.

    With ``include_float`` the sites a config left in floating point are listed too (kind ``float``).
    """
    rows: List[SiteInfo] = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        for slot, _ in module.slots():
            q = getattr(module, f"{slot}_quantizer", None)
            site = f"{name}.{slot}" if name else slot
            role = module.quant_roles.get(slot, slot)
            if q is None:
                if include_float:
                    rows.append(SiteInfo(site, role, "float", None, "-", True))
                continue
            gran = q.granularity_label
            if q.granularity != "tensor":
                gran += f"@{q.axis}"
            rows.append(SiteInfo(site, role, q.kind, q.bits, gran, bool(q.calibrated)))
    return rows


def format_sites(rows: List[SiteInfo]) -> str:
    """Render :func:`describe`'s rows as an aligned text table."""
    header = ["site", "role", "kind", "bits", "granularity", "calibrated"]
    table = [header] + [r.as_row() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
