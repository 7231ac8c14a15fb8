"""QuantSpec: the data that builds one quantizer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8


@dataclass
class QuantSpec:
    """How to quantize one tensor site.

    Args:
        kind: registered quantizer family (``qvit.quantizers.list_quantizers()``).
        bits: bit-width, 2..8.
        symmetric: symmetric grid around zero (no zero-point) or asymmetric with a zero-point.
        signed: signed integer range; ``None`` decides from the calibration data (min < 0).
        granularity: ``tensor``, ``channel`` (one scale per index of ``axis``) or ``group``
            (one scale per ``group_size`` consecutive indices of ``axis``; per-head for attention).
        axis: the channel axis (weights: 0 = output channels; activations: -1 = features).
        group_size: channels per group when ``granularity == "group"``.
        num_groups: instead of ``group_size``, the number of groups (the size follows from the tensor:
            PTQ4ViT's one scale for each of the q, k and v row blocks of a qkv weight is ``num_groups: 3``).
        init: range estimator used at calibration (``minmax``, ``percentile``, ``mse``, ``lsq`` ...);
            ``None`` keeps the family's default.
        enabled: ``False`` leaves the site in floating point.
        options: family-specific keyword arguments (e.g. ``percentile``, ``mode``, ``eta``).
    """

    kind: str = "uniform"
    bits: int = 8
    symmetric: bool = True
    signed: Optional[bool] = None
    granularity: str = "tensor"
    axis: int = -1
    group_size: int = 1
    num_groups: Optional[int] = None
    init: Optional[str] = None
    enabled: bool = True
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on settings no quantizer can honour."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.num_groups is not None and (isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int)
                                            or self.num_groups < 1):
            raise ValueError(f"num_groups must be a positive integer, got {self.num_groups!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantSpec":
        """Build from a flat mapping; keys that are not fields go to ``options``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "options"}
        options = dict(data.get("options", {}) or {})
        options.update({k: v for k, v in data.items() if k not in names})
        return cls(**known, options=options)

    def to_dict(self) -> Dict[str, Any]:
        """Flat mapping (options inlined) that ``from_dict`` turns back into an equal spec."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out.update(self.options)
        return out

    def merged(self, patch: Mapping[str, Any]) -> "QuantSpec":
        """A copy with ``patch`` (flat keys, options inlined) applied on top."""
        return QuantSpec.from_dict({**self.to_dict(), **dict(patch)})
