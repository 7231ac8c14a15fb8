"""Block reconstruction (I&S-ViT's SOS stages 1/3, optional QDrop) and the quantizer-state helpers."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import qvit
from qvit.calibration import calibrate
from qvit.ptq import list_steps
from qvit.ptq.reconstruct import (capture_unit_io, find_units, lp_loss, qdrop, quantizers_enabled, reconstruct,
                                  reconstruct_unit, trainable_parameters, unit_data, unit_loss)
from qvit.quantizers import Quantizer
from qvit.recipes import Recipe

W4A4 = dict(w_bits=4, a_bits=4)


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()


def tiny_swin():
    torch.manual_seed(0)
    return SwinTransformer(img_size=16, patch_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4,
                           num_classes=4).eval()


def images(n=16, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrated(fp, x, config=None):
    q = qvit.prepare(fp, config or W4A4, inplace=False)
    calibrate(q, x, progress=False)
    return q


def test_units_in_network_order():
    assert [(u.name, u.kind) for u in find_units(tiny_vit())] == [
        ("patch_embed.proj", "layer"), ("blocks.0", "block"), ("blocks.1", "block"), ("head", "layer")]
    assert [u.name for u in find_units(tiny_vit(), "blocks")] == ["blocks.0", "blocks.1"]
    assert [u.name for u in find_units(tiny_vit(), "layers")] == ["patch_embed.proj", "head"]
    assert [u.name for u in find_units(tiny_vit(), ["blocks.1", "blocks.1.mlp"])] == ["blocks.1"]
    assert [u.name for u in find_units(tiny_swin())] == [
        "patch_embed.proj", "layers.0.blocks.0", "layers.1.downsample", "layers.1.blocks.0", "head.fc"]
    with pytest.raises(ValueError, match="match no module"):
        find_units(tiny_vit(), ["nope"])


def test_trainable_parameters_exclude_norms_and_quantizers():
    fp = tiny_vit()
    q = calibrated(fp, images(), dict(W4A4, activation={"kind": "lsq_plus"}))
    names = {n for n, _ in trainable_parameters(q.blocks[0])}
    assert {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.bias"} <= names
    assert not any(n.startswith(("norm1", "norm2")) or "quantizer" in n for n in names)
    assert any("quantizer" in n for n, _ in q.blocks[0].named_parameters())  # LSQ scales exist, and are left out


def test_lp_loss_sums_over_dim1():
    pred, tgt = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert lp_loss(pred, tgt).item() == pytest.approx(3.0)


def test_one_unit_step_lowers_its_loss():
    fp, x = tiny_vit(), images()
    q = calibrated(fp, x)
    inputs, targets = unit_data(q, fp, "blocks.0", x, input_source="fp")
    before = unit_loss(q.blocks[0], inputs, targets)
    gen = torch.Generator().manual_seed(0)
    record = reconstruct_unit(q.blocks[0], inputs, targets, iters=10, lr=1e-3, batch_size=16, generator=gen)
    after = unit_loss(q.blocks[0], inputs, targets)
    assert after < before
    assert record["first_loss"] == pytest.approx(before, rel=1e-5)  # full batch: step 0 sees the whole cache
    assert record["last_loss"] < record["first_loss"]


def test_only_unit_weights_change():
    fp, x = tiny_vit(), images()
    q = calibrated(fp, x, dict(W4A4, activation={"kind": "lsq_plus"}))
    before = copy.deepcopy(q.state_dict())
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    records = reconstruct(q, fp, x, iters=5, lr=1e-3, batch_size=8, progress=False)
    assert [r["unit"] for r in records] == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    after = q.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for k in changed:
        assert "quantizer" not in k and ".norm" not in k and not k.startswith("norm."), k
    assert not {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.1.norm2.bias"} & changed
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"} <= changed
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    assert all(p.grad is None for p in q.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fp.state_dict().values(), tiny_vit().state_dict().values()))


def test_quantized_input_source_follows_the_reconstructed_quantized_model(monkeypatch):
    fp, x = tiny_vit(), images()
    q = calibrated(fp, x)
    fp_in, tgt = unit_data(q, fp, "blocks.1", x, input_source="fp")
    q_in, tgt_q = unit_data(q, fp, "blocks.1", x, input_source="quantized")
    assert torch.equal(tgt, tgt_q)
    assert not torch.allclose(fp_in, q_in)
    assert torch.equal(q_in, capture_unit_io(q, "blocks.1", x)[0])
    img_fp, _ = unit_data(q, fp, "patch_embed.proj", x, input_source="fp")
    img_q, _ = unit_data(q, fp, "patch_embed.proj", x, input_source="quantized")
    assert torch.equal(img_fp, img_q) and torch.equal(img_fp, x)
    calls = []
    q.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    capture_unit_io(q, "blocks.0", x, outputs=True)
    assert not calls  # the forward stops at the unit

    import qvit.ptq.reconstruct as rec
    seen = {}
    original = rec.reconstruct_unit

    def spy(module, inputs, targets, **kw):
        seen[module] = inputs.clone()
        return original(module, inputs, targets, **kw)

    monkeypatch.setattr(rec, "reconstruct_unit", spy)
    reconstruct(q, fp, x, input_source="quantized", iters=3, lr=1e-3, batch_size=8, progress=False)
    used = seen[q.blocks[1]]
    assert not torch.equal(used, q_in)  # block 0 was trained before block 1's input was computed
    assert torch.equal(used, capture_unit_io(q, "blocks.1", x)[0])


def test_quantizers_enabled_switches_weights_and_acts():
    q = calibrated(tiny_vit(), images())
    with quantizers_enabled(q, weights=False, acts=True):
        states = {(qz.for_weights, qz.enabled) for _, _, qz in qvit.iter_quantizers(q)}
        assert states == {(True, False), (False, True)}
    assert all(qz.enabled for _, _, qz in qvit.iter_quantizers(q))


def test_qdrop_extremes():
    fp, x = tiny_vit(), images(4)
    q = calibrated(fp, x)
    with torch.no_grad():
        quantized = q(x)
        with quantizers_enabled(q, acts=False):
            float_acts = q(x)
        with qdrop(q, 1.0):
            dropped_all = q(x)
        with qdrop(q, 0.0):
            dropped_none = q(x)
        with qdrop(q, 0.5, torch.Generator().manual_seed(0)):
            half = q(x)
    assert torch.equal(dropped_all, float_acts)
    assert torch.equal(dropped_none, quantized)
    assert not torch.equal(half, quantized) and not torch.equal(half, float_acts)
    assert not any(qz._forward_hooks for _, _, qz in qvit.iter_quantizers(q))


def test_qdrop_reconstruction_runs():
    fp, x = tiny_vit(), images(8)
    q = calibrated(fp, x)
    records = reconstruct(q, fp, x, iters=3, batch_size=4, units="blocks", qdrop_prob=0.5, progress=False)
    assert all(r["last_loss"] is not None for r in records)


def test_step_through_quantize_ptq():
    assert {"reconstruct", "set_quantizers"} <= set(list_steps())
    fp, x = tiny_vit(), images()
    recipe = Recipe.from_dict({
        "name": "sos_tiny",
        "config": {"weight": {"kind": "uniform", "symmetric": True, "granularity": "channel", "axis": 0}},
        "steps": [
            {"set_quantizers": {"weights": False}},
            {"calibrate": {"sequential": False}},
            {"reconstruct": {"input_source": "fp", "iters": 4, "batch_size": 8, "lr": 1e-3}},
            {"set_quantizers": {"weights": True, "recalibrate_weights": True}},
            {"reconstruct": {"input_source": "quantized", "iters": 4, "batch_size": 8, "lr": 1e-3,
                             "units": ["blocks.*"]}},
        ],
    })
    q = qvit.quantize_ptq(fp, recipe, x, progress=False, **W4A4)
    recs = [r for r in qvit.quant_state(q).log if r["step"] == "reconstruct" and "units" in r]
    assert [r["input_source"] for r in recs] == ["fp", "quantized"]
    assert [u["unit"] for u in recs[1]["units"]] == ["blocks.0", "blocks.1"]
    assert all(u["first_loss"] is not None and u["last_loss"] is not None for u in recs[0]["units"])
    assert all(qz.enabled and bool(qz.calibrated) for _, _, qz in qvit.iter_quantizers(q))
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_swin_reconstruction_runs():
    fp, x = tiny_swin(), images(8)
    q = calibrated(fp, x)
    records = reconstruct(q, fp, x, input_source="quantized", iters=2, batch_size=4, progress=False)
    assert [r["kind"] for r in records] == ["layer", "block", "block", "block", "layer"]
    assert "attn.relative_position_bias_table" in {n for n, _ in trainable_parameters(q.layers[0].blocks[0])}


def test_rejects_bad_setups():
    fp, x = tiny_vit(), images(4)
    q = qvit.prepare(fp, W4A4, inplace=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        reconstruct(q, fp, x, iters=1, progress=False)
    calibrate(q, x, progress=False)
    with pytest.raises(ValueError, match="input_source"):
        reconstruct(q, fp, x, input_source="teacher", progress=False)
    with pytest.raises(ValueError, match="shares parameters"):
        reconstruct(q, q, x, progress=False)
    assert not any(isinstance(m, Quantizer) for m in fp.modules())
    assert isinstance(fp.head, nn.Linear)
