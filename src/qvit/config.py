"""QuantConfig: which quantizer each site of a network gets, by role and by module-name glob."""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from .quantizers.spec import QuantSpec

#: Weight sites: symmetric, one scale per output channel, min-max range.
DEFAULT_WEIGHT: Dict[str, Any] = dict(kind="uniform", symmetric=True, granularity="channel", axis=0, init="minmax")
#: Activation sites: asymmetric, one scale per tensor, min-max range.
DEFAULT_ACTIVATION: Dict[str, Any] = dict(kind="uniform", symmetric=False, granularity="tensor", axis=-1,
                                          init="minmax")
#: Role defaults: 8-bit first and last layers (as in the papers), unsigned softmax output, and the
#: channel axis of 4-D activations (convolution inputs are NCHW; attention tensors are B, heads, N, D).
DEFAULT_ROLES: Dict[str, Dict[str, Any]] = {
    "stem.weight": dict(bits=8),
    "stem.input": dict(bits=8, axis=1),
    "head.weight": dict(bits=8),
    "head.input": dict(bits=8),
    "conv.input": dict(axis=1),
    "dwconv.input": dict(axis=1),
    "attn.q": dict(axis=1),
    "attn.k": dict(axis=1),
    "attn.v": dict(axis=1),
    "attn.probs": dict(symmetric=True, signed=False, axis=1),
}

PathLike = Union[str, Path]
#: Spec keys that survive a patch switching the site to another quantizer family.
PLACEMENT_KEYS = ("bits", "granularity", "axis", "group_size", "num_groups", "enabled", "signed")


def _patched(base: Mapping[str, Any], layer: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated with ``layer``; a layer that switches ``kind`` keeps only the placement keys of ``base``
    (where and how wide the site is), not the old family's init and options."""
    out = dict(base)
    if "kind" in layer and layer["kind"] != out.get("kind"):
        out = {k: v for k, v in out.items() if k in PLACEMENT_KEYS}
    out.update(layer)
    return out


@dataclass
class QuantConfig:
    """Maps every quantization site of a prepared network to a :class:`QuantSpec`.

    A site's spec is built in this order, each step patching the previous one:

    1. ``weight`` or ``activation`` defaults;
    2. ``roles[role]`` for the site's role (``qkv.weight``, ``attn.probs``, ``fc2.input``, ``stem.input`` ...);
    3. every entry of ``overrides`` whose glob matches the site's full name (``blocks.0.attn.qkv.weight``),
       in order. ``{"enabled": False}`` leaves a site in floating point.

    A site whose patches set no ``bits`` (or ``bits: null``) gets ``w_bits`` (weights) or ``a_bits``.

    ``transforms`` names structural rewrites that ``prepare`` applies after swapping the modules, in order
    (``qvit.models.list_transforms()``; e.g. ``query_key_reparameterization``, whose new sites take their specs from
    the roles ``attn.qk_weight`` and ``attn.qkx`` like any other site).

    Roles not listed keep the defaults; a role patch is merged into the built-in patch of that role. A patch
    (including one of ``weight``/``activation``) that switches ``kind`` drops the inherited family settings
    (``init``, ``symmetric`` and options) and keeps only the placement keys (bits, granularity, axis, group size,
    enabled, signed).
    """

    w_bits: int = 8
    a_bits: int = 8
    weight: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_WEIGHT))
    activation: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTIVATION))
    roles: Dict[str, Dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ROLES))
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    transforms: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            QuantSpec(bits=getattr(self, name))  # validates the range with a clear message
        if not isinstance(self.transforms, list) or not all(isinstance(t, str) for t in self.transforms):
            raise ValueError(f"transforms must be a list of transform names, got {self.transforms!r}")

    def spec_for(self, site: str, role: str, is_weight: bool) -> QuantSpec:
        """The spec for the site named ``site`` with role ``role``."""
        patch = dict(self.weight if is_weight else self.activation)
        for layer in [self.roles.get(role, {})] + [o for p, o in self.overrides.items() if fnmatch.fnmatchcase(site, p)]:
            patch = _patched(patch, layer)
        if patch.get("bits") is None:
            patch["bits"] = self.w_bits if is_weight else self.a_bits
        try:
            return QuantSpec.from_dict(patch)
        except (ValueError, TypeError) as err:
            raise ValueError(f"site {site!r} (role {role!r}): {err}") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dict(w_bits=self.w_bits, a_bits=self.a_bits, weight=dict(self.weight),
                    activation=dict(self.activation), roles=copy.deepcopy(self.roles),
                    overrides=copy.deepcopy(self.overrides), transforms=list(self.transforms))

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> "QuantConfig":
        """Build from a mapping; ``roles``/``weight``/``activation`` patch the defaults rather than replace them."""
        return cls().merged({**dict(data or {}), **kwargs})

    def merged(self, patch: Mapping[str, Any]) -> "QuantConfig":
        """A copy with ``patch`` applied the way :meth:`from_dict` applies it to the defaults."""
        out = copy.deepcopy(self)
        if "w_bits" in patch:
            out.w_bits = int(patch["w_bits"])
        if "a_bits" in patch:
            out.a_bits = int(patch["a_bits"])
        out.weight = _patched(out.weight, patch.get("weight") or {})
        out.activation = _patched(out.activation, patch.get("activation") or {})
        for role, p in (patch.get("roles") or {}).items():
            out.roles[role] = {**out.roles.get(role, {}), **(p or {})}
        out.overrides.update(patch.get("overrides") or {})
        if patch.get("transforms") is not None:
            out.transforms = patch["transforms"] if isinstance(patch["transforms"], list) else [patch["transforms"]]
        unknown = set(patch) - {"w_bits", "a_bits", "weight", "activation", "roles", "overrides", "transforms"}
        if unknown:
            raise ValueError(f"unknown QuantConfig keys: {sorted(unknown)}")
        out.__post_init__()
        return out

    @classmethod
    def from_yaml(cls, path: PathLike) -> "QuantConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_yaml(self, path: Optional[PathLike] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def coerce(cls, config: Union["QuantConfig", Mapping[str, Any], PathLike, None]) -> "QuantConfig":
        """Accept a QuantConfig, a mapping, a YAML path or None (defaults: W8A8)."""
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, (str, Path)):
            return cls.from_yaml(config)
        return cls.from_dict(config)
