"""``QuantModule``: the mixin every quantized module shares (slots, conversion, restoring)."""
from __future__ import annotations

from typing import ClassVar, Iterator, Mapping, Optional, Tuple

import torch.nn as nn

from ..quantizers import Quantizer, QuantSpec, create_quantizer
from .weight_site import WeightSite


class QuantModule:
    """Mixin for quantized versions of float modules.

    A quantized class subclasses its float class (so parameters, buffers and ``state_dict`` keys stay
    the same) and declares ``quant_slots``: ``(slot, is_weight)`` pairs. Each slot's quantizer lives in
    the attribute ``{slot}_quantizer`` (``None`` when the site stays in floating point).
    :meth:`convert` turns an existing float module into the quantized class in place.
    """

    quant_slots: ClassVar[Tuple[Tuple[str, bool], ...]] = ()
    #: plain attributes that select the module's arithmetic (saved with packed checkpoints)
    quant_flags: ClassVar[Tuple[str, ...]] = ()
    float_class: type

    @classmethod
    def convert(cls, module: nn.Module, specs: Mapping[str, Optional[QuantSpec]], name: str = "",
                roles: Optional[Mapping[str, str]] = None) -> nn.Module:
        """Swap ``module``'s class to ``cls`` in place and attach one quantizer per enabled slot."""
        module.float_class = type(module)
        module.__class__ = cls
        module.quant_roles = dict(roles or {})
        device = next((t.device for t in module.parameters()), None)
        for slot, is_weight in cls.quant_slots:
            spec = specs.get(slot)
            quantizer = None
            if spec is not None and spec.enabled:
                quantizer = create_quantizer(spec, for_weights=is_weight)
                quantizer.site = f"{name}.{slot}" if name else slot
                if device is not None:
                    quantizer.to(device)
            setattr(module, f"{slot}_quantizer", quantizer)
        module._init_quant()
        return module

    def _init_quant(self) -> None:
        """Hook for subclasses: extra set-up after conversion."""

    def slots(self) -> Tuple[Tuple[str, bool], ...]:
        """The class's ``quant_slots`` plus any added to this module later (``extra_quant_slots``, e.g. QKR's)."""
        return tuple(self.quant_slots) + tuple(getattr(self, "extra_quant_slots", ()))

    def quantizers(self) -> Iterator[Tuple[str, Quantizer]]:
        """``(slot, quantizer)`` for every enabled slot."""
        for slot, _ in self.slots():
            q = getattr(self, f"{slot}_quantizer", None)
            if q is not None:
                yield slot, q

    def restore_float(self) -> nn.Module:
        """Turn the module back into its float class (quantizers are dropped)."""
        for slot, _ in tuple(self.quant_slots) + tuple(getattr(self, "extra_quant_slots", ())):
            if hasattr(self, f"{slot}_quantizer"):
                delattr(self, f"{slot}_quantizer")
        if hasattr(self, "extra_quant_slots"):
            del self.extra_quant_slots
        cls = self.float_class
        del self.float_class, self.quant_roles
        self.__class__ = cls
        return self

    def weight_sites(self, name: str) -> Iterator[WeightSite]:
        """The :class:`WeightSite` of every enabled weight slot (its parameter is the attribute named like the slot);
        ``name`` is this module's name in the model. Modules that quantize other tensors override this."""
        for slot, is_weight in self.slots():
            q = getattr(self, f"{slot}_quantizer", None)
            if is_weight and q is not None:
                yield WeightSite(f"{name}.{slot}" if name else slot, name, self, q, parameter=getattr(self, slot))

    def float_weights_read(self) -> Tuple[str, ...]:
        """Child modules whose float (unquantized) ``weight`` this module's forward reads besides their own forward."""
        return ()

    def _quant(self, slot: str, x):
        q = getattr(self, f"{slot}_quantizer")
        return x if q is None else q(x)
