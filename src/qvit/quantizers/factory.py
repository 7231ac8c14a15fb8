"""Build a quantizer from a :class:`QuantSpec` (or a flat mapping)."""
from __future__ import annotations

from typing import Any, Mapping, Union

from ._registry import get_quantizer_class
from .base import Quantizer
from .spec import QuantSpec


def create_quantizer(spec: Union[QuantSpec, Mapping[str, Any]], **overrides: Any) -> Quantizer:
    """Instantiate the family named by ``spec.kind`` with the spec's settings.

    Raises ``ValueError`` for invalid settings and ``KeyError`` for an unknown kind; a family that does
    not accept one of the options raises ``TypeError`` naming it.
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.from_dict(spec)
    if overrides:
        spec = spec.merged(overrides)
    cls = get_quantizer_class(spec.kind)
    kwargs = dict(symmetric=spec.symmetric, signed=spec.signed, granularity=spec.granularity, axis=spec.axis,
                  group_size=spec.group_size, **spec.options)
    if spec.num_groups is not None:
        kwargs["num_groups"] = spec.num_groups
    if spec.init is not None:
        kwargs["init"] = spec.init
    try:
        return cls(spec.bits, **kwargs)
    except TypeError as err:
        raise TypeError(f"quantizer kind {spec.kind!r}: {err}") from None
