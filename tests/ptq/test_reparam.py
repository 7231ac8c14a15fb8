"""RepQ-ViT's post-LayerNorm scale reparameterization and the ``repq`` / ``dopq`` recipes."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

import qvit
import qvit.ptq.reparam  # noqa: F401  (registers the reparameterize_post_ln step)
from qvit.calibration import calibrate
from qvit.ptq.reparam import (find_post_ln_pairs, match_reparameterized_state, reparameterize_pair,
                              reparameterize_post_ln, target_scale)
from qvit.quantizers import create_quantizer
from qvit.recipes import load_recipe


def tiny_swin():
    return SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                           num_classes=3).eval()


def randomize_norms(model):
    """Non-trivial LayerNorm affines, so the channel scales (and the ratios r) differ a lot."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 3 + 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def prepared(fp, recipe="repq"):
    return qvit.prepare(fp, load_recipe(recipe).quant_config(w_bits=4, a_bits=4), inplace=False)


def set_enabled(model, flag):
    for _, _, q in qvit.iter_quantizers(model):
        q.enabled = flag


def float_output(model, x):
    set_enabled(model, False)
    with torch.no_grad():
        out = model(x)
    set_enabled(model, True)
    return out


def input_granularities(model, roles=("qkv.input", "fc1.input", "reduction.input")):
    return {r.site: r.granularity for r in qvit.describe(model, include_float=False) if r.role in roles}


# ------------------------------------------------------------------------------------------- float exactness
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_float_output_unchanged(arch):
    if arch == "vit":
        fp, x, expected = timm.create_model("test_vit").eval(), torch.randn(2, 3, 160, 160), 12
    else:
        fp, x, expected = tiny_swin(), torch.randn(2, 3, 32, 32), 9  # 4 blocks x 2 + one PatchMerging
    randomize_norms(fp)
    model = prepared(fp)
    calibrate(model, x, sequential=True, progress=False)
    assert set(input_granularities(model).values()) == {"channel@-1"}
    before = float_output(model, x)
    result = reparameterize_post_ln(model)
    assert len(result.layers) == expected and not result.skipped
    after = float_output(model, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert set(input_granularities(model).values()) == {"tensor"}
    assert qvit.uncalibrated_sites(model) == []  # the reset weight quantizers were re-calibrated
    if arch == "swin":
        assert "layers.1.downsample.reduction" in result.layers
        assert model.layers[1].downsample.reduction.bias is not None  # created: the layer had none
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------------------------------------- hand example
def hand_modules(bias=True):
    norm, lin = nn.LayerNorm(4), nn.Linear(4, 3, bias=bias)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0, 3.0, 1.0]))
        norm.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0], [-1.0, 0.0, 1.0, 0.0]]))
        if bias:
            lin.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    return norm, lin


def test_hand_checked_example():
    # s = [1, 2, 3, 2] -> s̃ = 2, r = [.5, 1, 1.5, 1]; z = [0, 2, 4, 2] -> z̃ = 2
    # b_vec = -z s / r + z̃ s̃ = 2 (z̃ - z) = [4, 0, -4, 0]
    # γ' = γ / r = [4, 1, 2, 1];  β' = β / r - b_vec = [2 - 4, 0, -2/3 + 4, .5] = [-2, 0, 10/3, .5]
    # W' = W r = [[.5, 2, 4.5, 4], [0, 1, 0, 1], [-.5, 0, 1.5, 0]];  W' b_vec = [2 - 18, 0, -2 - 6] = [-16, 0, -8]
    norm, lin = hand_modules()
    x = torch.randn(5, 4)
    ref = lin(norm(x)).detach()
    s_t, z_t = reparameterize_pair(norm, lin, torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([0.0, 2.0, 4.0, 2.0]))
    assert s_t.item() == 2.0 and z_t.item() == 2.0
    torch.testing.assert_close(norm.weight.data, torch.tensor([4.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(norm.bias.data, torch.tensor([-2.0, 0.0, 10 / 3, 0.5]))
    torch.testing.assert_close(lin.weight.data, torch.tensor([[0.5, 2.0, 4.5, 4.0], [0.0, 1.0, 0.0, 1.0],
                                                              [-0.5, 0.0, 1.5, 0.0]]))
    torch.testing.assert_close(lin.bias.data, torch.tensor([1.0 - 16.0, 2.0, 3.0 - 8.0]))
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_hand_example_without_bias_creates_one():
    norm, lin = hand_modules(bias=False)
    x = torch.randn(5, 4)
    ref = lin(norm(x)).detach()
    reparameterize_pair(norm, lin, torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([0.0, 2.0, 4.0, 2.0]))
    assert isinstance(lin.bias, nn.Parameter) and "bias" in lin.state_dict()
    torch.testing.assert_close(lin.bias.data, torch.tensor([-16.0, 0.0, -8.0]))
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_fractional_and_rounded_zero_point():
    z = torch.tensor([0.0, 1.0, 1.0, 1.0])  # mean 0.75
    _, z_t = reparameterize_pair(*hand_modules(), torch.ones(4), z)
    assert z_t.item() == 0.75  # RepQ-ViT: the mean zero-point is not rounded
    _, z_t = reparameterize_pair(*hand_modules(), torch.ones(4), z, round_zero_point=True)
    assert z_t.item() == 1.0


def test_integer_zero_point_reproduces_channel_wise_quantization():
    """With z̃ rounded, per-tensor quantization of the folded LayerNorm output equals channel-wise quantization."""
    norm, lin = nn.LayerNorm(8), nn.Linear(8, 5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.2, 4.0, 8))
        norm.bias.copy_(torch.linspace(-2.0, 1.0, 8))
    x = torch.randn(64, 8)
    q = create_quantizer(dict(kind="uniform", bits=4, symmetric=False, granularity="channel", axis=-1,
                              include_zero=False))
    q.calibrate(norm(x).detach())
    with torch.no_grad():
        ref = F.linear(q(norm(x)), lin.weight, lin.bias)
        s_t, z_t = reparameterize_pair(norm, lin, q.scale, q.zero_point, round_zero_point=True)
        qvit.ptq.reparam.set_per_tensor(q, s_t, z_t)
        out = F.linear(q(norm(x)), lin.weight, lin.bias)
    assert q.granularity == "tensor" and q.scale.shape == (1,)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- mean vs median
def test_median_ignores_an_outlier_channel():
    s = torch.tensor([1.0, 1.2, 0.8, 1.0, 50.0])
    assert target_scale(s, "mean").item() == pytest.approx(10.8)
    assert target_scale(s, "median").item() == pytest.approx(1.0)
    assert target_scale(torch.tensor([1.0, 2.0, 3.0, 100.0]), "median").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="target"):
        target_scale(s, "max")
    norm, lin = nn.LayerNorm(5), nn.Linear(5, 2)
    w = lin.weight.detach().clone()
    s_t, _ = reparameterize_pair(norm, lin, s, torch.zeros(5), target="median")
    assert s_t.item() == pytest.approx(1.0)
    # the inlier channels keep their scale (r = s / 1), only the outlier's column is rescaled by 50
    torch.testing.assert_close(lin.weight.data, w * s)
    norm_m, lin_m = nn.LayerNorm(5), nn.Linear(5, 2)
    reparameterize_pair(norm_m, lin_m, s, torch.zeros(5), target="mean")
    assert norm_m.weight[:4].max().item() > 5  # the mean shrinks every inlier ratio to about 1/10.8


# ------------------------------------------------------------------------------------------- pairs / skips
def test_pairs_are_found_by_block_class_and_skips_are_explained():
    pairs = find_post_ln_pairs(tiny_swin())
    names = [(p.norm_name, p.linear_name) for p in pairs]
    assert ("layers.1.downsample.norm", "layers.1.downsample.reduction") in names
    assert ("layers.0.blocks.1.norm1", "layers.0.blocks.1.attn.qkv") in names
    assert len(find_post_ln_pairs(tiny_swin(), patch_merging=False)) == 8
    padded = SwinTransformer(img_size=24, patch_size=2, embed_dim=16, depths=(2,), num_heads=(1,), window_size=8)
    skipped = {}
    pairs = find_post_ln_pairs(padded, skipped=skipped)
    assert [p.linear_name for p in pairs] == ["layers.0.blocks.0.mlp.fc1", "layers.0.blocks.1.mlp.fc1"]
    assert "padding" in skipped["layers.0.blocks.0.attn.qkv"]


def test_per_tensor_inputs_are_skipped_and_uncalibrated_inputs_rejected():
    fp, x = timm.create_model("test_vit").eval(), torch.randn(2, 3, 160, 160)
    model = qvit.prepare(fp, dict(w_bits=4, a_bits=4), inplace=False)  # post-LN inputs per tensor
    calibrate(model, x, progress=False)
    result = reparameterize_post_ln(model)
    assert result.layers == [] and "channel-wise" in result.skipped["blocks.0.attn.qkv"]
    with pytest.raises(RuntimeError, match="calibrate"):
        reparameterize_post_ln(prepared(fp))


# ------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe, probs, target", [("repq", "log_sqrt2", "mean"), ("dopq", "tanq", "median")])
def test_recipes_run_end_to_end(recipe, probs, target):
    fp = timm.create_model("test_vit").eval()
    x = torch.randn(4, 3, 160, 160)
    q = qvit.quantize_ptq(fp, qvit.load_recipe(recipe).quick_variant(), x, w_bits=4, a_bits=4, progress=False)
    rows = qvit.describe(q, include_float=False)
    post_ln = [r for r in rows if r.role in ("qkv.input", "fc1.input")]
    assert len(post_ln) == 12 and all(r.granularity == "tensor" and r.calibrated for r in post_ln)
    assert all(r.calibrated for r in rows)
    assert {r.kind for r in rows if r.role == "attn.probs"} == {probs}
    assert {r.bits for r in rows if r.role == "stem.input"} == {8}
    record = next(e for e in qvit.quant_state(q).log if "reparameterized" in e)
    assert record["reparameterized"] == 12 and record["target"] == target
    with torch.no_grad():
        out, ref = q(x), fp(x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


# ------------------------------------------------------------------------------------------- state dict
def test_state_dict_round_trip_vit():
    fp, x = timm.create_model("test_vit").eval(), torch.randn(2, 3, 160, 160)
    q = qvit.quantize_ptq(fp, "repq", x, w_bits=4, a_bits=4, progress=False)
    sd = q.state_dict()
    assert sd["blocks.0.attn.qkv.input_quantizer.scale"].shape == (1,)
    with torch.no_grad():
        ref = q(x)
    # a model prepared with the recipe's config: channel-wise sites, adapted to the state dict, then loaded
    fresh = prepared(timm.create_model("test_vit").eval())
    assert len(match_reparameterized_state(fresh, sd)) == 12
    fresh.load_state_dict(sd)
    assert set(input_granularities(fresh).values()) == {"tensor"}
    # a model prepared with the quantized model's own config needs no adapting
    again = qvit.prepare(timm.create_model("test_vit").eval(), qvit.quant_state(q).config)
    assert set(input_granularities(again).values()) == {"tensor"}
    again.load_state_dict(sd)
    assert match_reparameterized_state(again, sd) == []
    with torch.no_grad():
        assert torch.equal(fresh(x), ref) and torch.equal(again(x), ref)


def test_state_dict_round_trip_swin_with_created_bias():
    x = torch.randn(2, 3, 32, 32)
    q = qvit.quantize_ptq(tiny_swin(), "repq", x, w_bits=4, a_bits=4, progress=False)
    sd = q.state_dict()
    assert "layers.1.downsample.reduction.bias" in sd
    with torch.no_grad():
        ref = q(x)
    fresh = prepared(tiny_swin())
    with pytest.raises(RuntimeError, match="reduction.bias"):
        fresh.load_state_dict(sd)  # the float layer has no bias: the model must be adapted first
    fresh = prepared(tiny_swin())
    assert "layers.1.downsample.reduction" in match_reparameterized_state(fresh, sd)
    fresh.load_state_dict(sd)
    assert set(input_granularities(fresh).values()) == {"tensor"}
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_codes_refuse_a_fractional_zero_point():
    import timm
    import torch

    import qvit

    fp = timm.create_model("test_vit").eval()
    x = torch.randn(2, 3, 160, 160)
    q = qvit.quantize_ptq(fp, "repq", x, w_bits=4, a_bits=4, progress=False)
    site = q.blocks[0].attn.qkv.input_quantizer
    if torch.equal(site.zero_point, torch.round(site.zero_point)):
        return  # an integer mean: nothing to refuse
    with pytest.raises(ValueError, match="fractional"):
        site.quantize(torch.randn(3))
