"""Query-key reparameterization: exact in floating point (query bias kept), gradients reach W_q and W_k, declared in
the config and built by ``prepare``."""
import copy

import pytest
import timm
import torch

import qvit
from qvit.nn.qkr import enable_qkr
from qvit.ptq import quantizers_enabled

CONFIG = {"weight": {"kind": "statsq"}, "activation": {"kind": "lsq", "symmetric": True, "init": "lsq"},
          "roles": {"attn.qk_weight": {"kind": "statsq", "granularity": "channel", "axis": 0},
                    "attn.qkx": {"granularity": "channel", "axis": 1}},
          "w_bits": 3, "a_bits": 3}
QKR = {**CONFIG, "transforms": ["query_key_reparameterization"]}


def _float():
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", img_size=32).eval()
    with torch.no_grad():
        for blk in fp.blocks:
            blk.attn.qkv.bias.normal_(0, 0.5)          # a real query and key bias
    return fp


def test_qkr_is_exact_in_floating_point():
    fp = _float()
    plain = qvit.prepare(copy.deepcopy(fp), CONFIG)
    model = qvit.prepare(fp, QKR)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), quantizers_enabled(plain, weights=False, acts=False):
        ref = plain(x)
    with torch.no_grad(), quantizers_enabled(model, weights=False, acts=False):
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # without the key-dependent query-bias term the function changes (what dropping the biases does)
    bias = model.blocks[0].attn.qkv.bias
    d = bias.numel() // 3
    with torch.no_grad(), quantizers_enabled(model, weights=False, acts=False):
        bias[:d] = 0
        assert not torch.allclose(model(x), ref, atol=1e-3)


def test_prepare_builds_qkr_sites_from_the_config_and_gradients_reach_query_and_key():
    model = qvit.prepare(_float(), QKR)
    assert all(blk.attn.qkr for blk in model.blocks)
    rows = {r.site: r for r in qvit.describe(model)}
    assert rows["blocks.0.attn.qk_weight"].kind == "statsq" and rows["blocks.0.attn.qk_weight"].bits == 3
    assert rows["blocks.0.attn.qk_weight"].granularity == "channel@0"
    assert rows["blocks.0.attn.qkx"].kind == "lsq" and rows["blocks.0.attn.qkx"].granularity == "channel@1"
    assert rows["blocks.0.attn.qkx"].role == "attn.qkx" and not rows["blocks.0.attn.qkx"].calibrated
    assert "blocks.0.attn.q" not in rows and "blocks.0.attn.k" not in rows      # the logits no longer use them
    x = torch.randn(4, 3, 32, 32)
    qvit.calibrate(model, x, progress=False)       # the new sites calibrate with all the others
    assert not qvit.calibration.uncalibrated_sites(model)
    model.train()
    model(x).pow(2).sum().backward()
    grad = model.blocks[0].attn.qkv.weight.grad
    d = grad.shape[0] // 3
    assert grad[:d].abs().sum() > 0 and grad[d:2 * d].abs().sum() > 0 and grad[2 * d:].abs().sum() > 0
    with pytest.raises(ValueError, match="no quantized timm Attention"):
        enable_qkr(model, qvit.QuantConfig.from_dict(QKR))          # already switched: nothing left to convert


def test_qkr_site_overrides_and_unknown_transforms():
    model = qvit.prepare(_float(), {**QKR, "overrides": {"blocks.0.attn.qkx": {"enabled": False},
                                                         "blocks.1.attn.qk_weight": {"bits": 8}}})
    rows = {r.site: r for r in qvit.describe(model)}
    assert rows["blocks.0.attn.qkx"].kind == "float" and rows["blocks.1.attn.qk_weight"].bits == 8
    qvit.calibrate(model, torch.randn(2, 3, 32, 32), progress=False)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    qvit.unprepare(model)
    assert not hasattr(model.blocks[0].attn, "qkx_quantizer") and not hasattr(model.blocks[0].attn, "q_quantizer")
    again = qvit.prepare(model, CONFIG)                # re-prepared without the transform: plain attention again
    assert not again.blocks[0].attn.qkr and again.blocks[0].attn.q_quantizer is not None
    with pytest.raises(ValueError, match="unknown transform 'nosuch'.*query_key_reparameterization"):
        qvit.prepare(_float(), {"transforms": ["nosuch"]})
    with pytest.raises(ValueError, match="transforms must be a list"):
        qvit.QuantConfig.from_dict({"transforms": [3]})
