import pytest

from qvit import QuantConfig


def test_spec_resolution_order():
    cfg = QuantConfig.from_dict(dict(w_bits=4, a_bits=3, roles={"fc2.input": {"init": "percentile"}},
                                     overrides={"blocks.1.*": {"bits": 6}, "*.attn.probs": {"enabled": False}}))
    w = cfg.spec_for("blocks.0.mlp.fc1.weight", "fc1.weight", True)
    assert (w.kind, w.bits, w.symmetric, w.granularity, w.axis) == ("uniform", 4, True, "channel", 0)
    a = cfg.spec_for("blocks.0.mlp.fc2.input", "fc2.input", False)
    assert (a.bits, a.init, a.symmetric, a.granularity) == (3, "percentile", False, "tensor")
    assert cfg.spec_for("blocks.1.mlp.fc2.input", "fc2.input", False).bits == 6
    assert cfg.spec_for("blocks.0.attn.probs", "attn.probs", False).enabled is False
    # first and last layers stay at 8 bits by default
    assert cfg.spec_for("patch_embed.proj.weight", "stem.weight", True).bits == 8
    assert cfg.spec_for("head.input", "head.input", False).bits == 8
    probs = QuantConfig().spec_for("blocks.0.attn.probs", "attn.probs", False)
    assert probs.signed is False and probs.symmetric is True


def test_yaml_round_trip(tmp_path):
    cfg = QuantConfig.from_dict(dict(w_bits=2, a_bits=4, overrides={"head.*": {"bits": 8}}))
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = QuantConfig.from_yaml(path)
    assert again.to_dict() == cfg.to_dict()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"wbits": 4})
    cfg = QuantConfig.from_dict({"roles": {"qkv.weight": {"granularity": "rows"}}})
    with pytest.raises(ValueError, match="qkv.weight"):
        cfg.spec_for("blocks.0.attn.qkv.weight", "qkv.weight", True)


def test_null_bits_in_a_role_means_the_global_bit_width():
    cfg = QuantConfig.from_dict(dict(w_bits=3, a_bits=4, roles={"head.weight": {"bits": None},
                                                                "head.input": {"bits": None}}))
    assert cfg.spec_for("head.weight", "head.weight", True).bits == 3
    assert cfg.spec_for("head.input", "head.input", False).bits == 4
    assert cfg.spec_for("patch_embed.proj.weight", "stem.weight", True).bits == 8


def test_switching_kind_drops_the_old_family_settings():
    cfg = QuantConfig.from_dict(dict(
        w_bits=4, a_bits=4, activation={"init": "percentile", "percentile": [99.9]},
        roles={"fc1.input": {"kind": "lsq"}, "fc2.input": {"kind": "twin_uniform", "mode": "gelu"},
               "qkv.weight": {"kind": "statsq"}}))
    lsq = cfg.spec_for("blocks.0.mlp.fc1.input", "fc1.input", False)
    assert (lsq.kind, lsq.init, lsq.symmetric, lsq.bits, lsq.options) == ("lsq", None, True, 4, {})
    twin = cfg.spec_for("blocks.0.mlp.fc2.input", "fc2.input", False)
    assert twin.init is None and twin.options == {"mode": "gelu"}
    assert cfg.spec_for("blocks.0.attn.qkv.weight", "qkv.weight", True).granularity == "channel"
