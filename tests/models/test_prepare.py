import pytest
import timm
import torch
import torch.nn as nn
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention

import qvit
from qvit.nn import QuantModule

QUANTIZABLE = (nn.Linear, nn.Conv2d, Attention, WindowAttention)
EXPECTED_ROLES = {
    "deit_tiny_patch16_224": {"stem", "head", "qkv", "proj", "fc1", "fc2", "attn"},
    "swin_tiny_patch4_window7_224": {"stem", "head", "qkv", "proj", "fc1", "fc2", "attn", "reduction"},
    "mobilenetv2_100": {"stem", "head", "conv", "dwconv"},
}


def _calibrated(name, config=None, batch=2, seed=0):
    model = timm.create_model(name).eval()
    torch.manual_seed(seed)
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        ref = model(x)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    qvit.prepare(model, config)
    qvit.calibrate(model, x, progress=False)
    return model, x, ref, fp_state


@pytest.mark.parametrize("name", sorted(EXPECTED_ROLES))
def test_prepare_covers_every_site(name):
    model, x, ref, fp_state = _calibrated(name, dict(w_bits=4, a_bits=4))
    for mod_name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE):
            assert isinstance(module, QuantModule), f"{mod_name} ({type(module).__name__}) was not swapped"
    rows = qvit.describe(model)
    assert {r.role.split(".")[0] for r in rows} == EXPECTED_ROLES[name]
    assert all(r.calibrated for r in rows)
    by_role = {r.role: r for r in rows}
    assert by_role["stem.weight"].bits == 8 and by_role["head.input"].bits == 8
    body = "attn.probs" if "attn.probs" in by_role else "conv.weight"
    assert by_role[body].bits == 4
    # float parameters and buffers are shared, under the same keys
    state = model.state_dict()
    for key, value in fp_state.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_float_state_dict_loads_into_prepared_model():
    fp = timm.create_model("test_vit")
    prepared = qvit.prepare(timm.create_model("test_vit"))
    result = prepared.load_state_dict(fp.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all("_quantizer." in k for k in result.missing_keys)


def test_deit_w8a8_logits_stay_close_to_fp():
    """Tolerance: relative L2 error of the logits < 5 %, cosine similarity > 0.998.

    Every one of deit_tiny's 148 sites is quantized (8-bit per-tensor min-max activations, per-channel
    weights). Each site adds rounding noise of about range / 2^8 / sqrt(12); on a random-init network
    with Gaussian inputs the min-max ranges are set by outliers, and the accumulated error measured here
    is about 3 % (W4A4 gives about 50 %). The bound leaves headroom for other CPUs' float ordering while
    still failing on any real bug (a skipped rescale, a wrong zero-point or axis costs far more)."""
    model, x, ref, _ = _calibrated("deit_tiny_patch16_224", dict(w_bits=8, a_bits=8), batch=4)
    with torch.no_grad():
        out = model(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel < 0.05 and cos > 0.998, (rel, cos)
    w4, x4, ref4, _ = _calibrated("deit_tiny_patch16_224", dict(w_bits=4, a_bits=4), batch=4)
    with torch.no_grad():
        rel4 = ((w4(x4) - ref4).norm() / ref4.norm()).item()
    assert rel4 > 4 * rel


def test_quantized_state_dict_round_trip():
    model, x, _, _ = _calibrated("test_vit", dict(w_bits=4, a_bits=4, activation={"init": "percentile"}))
    fresh = qvit.prepare(timm.create_model("test_vit").eval(), dict(w_bits=4, a_bits=4,
                                                                     activation={"init": "percentile"}))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_uncalibrated_model_raises_clear_error():
    model = qvit.prepare(timm.create_model("test_vit").eval())
    with pytest.raises(qvit.NotCalibratedError, match="never calibrated"):
        model(torch.randn(1, 3, 160, 160))
    assert len(qvit.uncalibrated_sites(model)) == len(qvit.describe(model, include_float=False))


def test_overrides_by_glob_and_disabled_sites():
    model = qvit.prepare(timm.create_model("test_vit"),
                         dict(w_bits=4, a_bits=4, overrides={"blocks.0.*": {"bits": 6},
                                                             "*.attn.probs": {"enabled": False}}))
    rows = {r.site: r for r in qvit.describe(model)}
    assert rows["blocks.0.attn.qkv.weight"].bits == 6
    assert rows["blocks.1.attn.qkv.weight"].bits == 4
    assert rows["blocks.1.attn.probs"].kind == "float"
    with pytest.raises(ValueError, match="already prepared"):
        qvit.prepare(model)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "resnet18", "efficientnet_lite0"])
def test_cnns_prepare_and_run(name):
    model, x, ref, _ = _calibrated(name, None)
    with torch.no_grad():
        out = model(x)
    assert ((out - ref).norm() / ref.norm()) < 0.1


def test_every_family_can_be_chosen_by_role():
    config = dict(w_bits=4, a_bits=4, roles={
        "qkv.weight": {"kind": "statsq"}, "fc1.weight": {"kind": "lsq"}, "fc1.input": {"kind": "lsq"},
        "fc2.input": {"kind": "twin_uniform", "mode": "gelu"}, "proj.input": {"kind": "lsq_plus"},
        "fc2.weight": {"kind": "pow2"}, "attn.probs": {"kind": "log_sqrt2"}})
    model, x, ref, _ = _calibrated("test_vit", config)
    kinds = {r.role: r.kind for r in qvit.describe(model)}
    assert kinds["qkv.weight"] == "statsq" and kinds["fc2.input"] == "twin_uniform"
    assert model.blocks[0].mlp.fc1.input_quantizer.init == "lsq"
    assert model.blocks[0].mlp.fc1.input_quantizer.signed is True  # LayerNorm output is signed
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_feature_extractor_has_no_head_role():
    model = qvit.prepare(timm.create_model("test_vit", num_classes=0))
    roles = {r.role for r in qvit.describe(model)}
    assert "head.weight" not in roles and "fc2.weight" in roles
    assert model.blocks[-1].mlp.fc2.weight_quantizer.bits == 8  # W8A8 default config, not a head override
    q4 = qvit.prepare(timm.create_model("test_vit", num_classes=0), dict(w_bits=4, a_bits=4))
    assert q4.blocks[-1].mlp.fc2.weight_quantizer.bits == 4


def test_override_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="matches no site"):
        qvit.prepare(timm.create_model("test_vit"), dict(overrides={"head": {"bits": 6}}))


def test_channel_wise_sites_on_swin_nhwc_and_per_head_attention():
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                            window_size=4, num_classes=3).eval()
    config = dict(roles={"reduction.input": {"granularity": "channel", "axis": -1},
                         "attn.q": {"granularity": "channel", "axis": 1},
                         "attn.probs": {"granularity": "channel", "axis": 1}})
    qvit.prepare(model, config)
    qvit.calibrate(model, torch.randn(2, 3, 32, 32), progress=False)
    reduction = model.layers[1].downsample.reduction
    assert reduction.input_quantizer.scale.shape == (reduction.in_features,)  # channels last (NHWC input)
    attn = model.layers[1].blocks[0].attn
    assert attn.q_quantizer.scale.shape == (2,) and attn.probs_quantizer.scale.shape == (2,)  # per head
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
