"""qvit.settings: the environment read once, process-wide and scoped changes, unknown names refused."""
import pytest

import qvit
from qvit.runtime import Settings


def test_the_environment_gives_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("QVIT_FUSED", "0")
    monkeypatch.setenv("QVIT_RECOMPUTE", "off")
    monkeypatch.setenv("QVIT_DEBUG", "1")
    monkeypatch.setenv("QVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QVIT_FASHION_MNIST", str(tmp_path / "fm"))
    s = Settings.from_environment()
    assert (s.fused, s.recompute, s.static_kernels, s.debug) == (False, False, True, True)
    assert s.cache_dir == tmp_path / "cache" and s.fashion_mnist == tmp_path / "fm"
    for name in ("QVIT_FUSED", "QVIT_RECOMPUTE", "QVIT_DEBUG", "QVIT_CACHE", "QVIT_FASHION_MNIST"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    s = Settings.from_environment()
    assert s.fused and s.recompute and not s.debug and s.cache_dir == tmp_path / "xdg" / "qvit"


def test_a_block_changes_settings_and_restores_them_even_on_error():
    before = qvit.get_settings()
    with qvit.settings(fused=False) as inside:
        assert qvit.get_settings() is inside and not inside.fused
        with qvit.settings(recompute=False, cache_dir="/tmp/x"):
            assert not qvit.get_settings().fused and not qvit.get_settings().recompute
            assert str(qvit.get_settings().cache_dir) == "/tmp/x"
        assert qvit.get_settings().recompute == before.recompute
    assert qvit.get_settings() == before
    with pytest.raises(RuntimeError), qvit.settings(fused=not before.fused):
        raise RuntimeError
    assert qvit.get_settings() == before


def test_set_settings_lasts_and_bad_names_or_limits_are_refused():
    before = qvit.get_settings()
    try:
        assert qvit.set_settings(static_kernels=False).static_kernels is False
        assert qvit.get_settings().static_kernels is False
    finally:
        qvit.set_settings(static_kernels=before.static_kernels)
    with pytest.raises(ValueError, match="unknown qvit settings.*fussed"):
        qvit.settings(fussed=True).__enter__()
    with pytest.raises(ValueError, match="static_max_signatures must be >= 1"):
        qvit.set_settings(static_max_signatures=0)
    assert qvit.get_settings() == before
