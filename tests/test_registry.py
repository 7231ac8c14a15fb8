"""The generic Registry behind every plug-in point."""
import pytest

import qvit
from qvit.registry import Registry


def test_a_registry_adds_finds_and_refuses_a_second_owner():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    reg.add("a", len)
    assert reg.get("b") is b and reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    reg.add("a", len)                                   # the same object again: fine
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", abs)
    with pytest.raises(KeyError, match="unknown widget 'c'; known: a, b"):
        reg.get("c")


def test_class_keys_find_the_nearest_base():
    reg = Registry("space for")

    class Base:
        pass

    class Child(Base):
        pass
    reg.add(Base, "base")
    assert reg.find(Child) == "base" and reg.find(int) is None and reg.names() == [Base.__qualname__]


def test_every_plug_in_point_is_a_registry():
    from qvit.nn._registry import QUANT_MODULES
    from qvit.ptq.interval_search import SEARCH_SPACES
    from qvit.ptq.steps import STEPS
    from qvit.qat.callbacks import CALLBACKS
    from qvit.quantizers._registry import QUANTIZERS
    from qvit.quantizers.ranges import RANGES
    for reg, member in [(QUANTIZERS, "lsq"), (RANGES, "mse"), (STEPS, "calibrate"), (CALLBACKS, "track_oscillations")]:
        assert isinstance(reg, Registry) and member in reg
    assert isinstance(QUANT_MODULES, Registry) and isinstance(SEARCH_SPACES, Registry) and len(SEARCH_SPACES) > 0
    assert qvit.list_quantizers() == QUANTIZERS.names()
    with pytest.raises(KeyError, match="unknown quantizer kind 'nope'"):
        qvit.create_quantizer({"kind": "nope"})
