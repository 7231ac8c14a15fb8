"""Query-key reparameterization: exact in floating point (query bias kept), gradients reach W_q and W_k."""
import pytest
import timm
import torch

import qvit
from qvit.nn.qkr import enable_qkr
from qvit.ptq import quant_state

W_SPEC = {"kind": "statsq", "granularity": "channel", "axis": 0}
X_SPEC = {"kind": "lsq", "symmetric": True, "granularity": "channel", "axis": 1, "init": "lsq"}


def _model():
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", img_size=32).eval()
    with torch.no_grad():
        for blk in fp.blocks:
            blk.attn.qkv.bias.normal_(0, 0.5)          # a real query and key bias
    model = qvit.prepare(fp, {"weight": {"kind": "statsq"}, "activation": {"kind": "lsq", "symmetric": True,
                                                                          "init": "lsq"}, "w_bits": 3, "a_bits": 3})
    return model


def test_qkr_is_exact_in_floating_point():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), quant_state(model, weights=False, acts=False):
        ref = model(x)
    enable_qkr(model, W_SPEC, X_SPEC)
    with torch.no_grad(), quant_state(model, weights=False, acts=False):
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # without the key-dependent query-bias term the function changes (what dropping the biases does)
    bias = model.blocks[0].attn.qkv.bias
    d = bias.numel() // 3
    with torch.no_grad(), quant_state(model, weights=False, acts=False):
        bias[:d] = 0
        assert not torch.allclose(model(x), ref, atol=1e-3)


def test_qkr_quantized_gradients_reach_query_and_key_weights():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    qvit.calibrate(model, x, progress=False)
    names = enable_qkr(model, W_SPEC, X_SPEC)
    assert names == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    model(x).pow(2).sum().backward()
    attn = model.blocks[0].attn
    grad = attn.qkv.weight.grad
    d = grad.shape[0] // 3
    assert grad[:d].abs().sum() > 0 and grad[d:2 * d].abs().sum() > 0 and grad[2 * d:].abs().sum() > 0
    rows = {r.site: r for r in qvit.describe(model)}
    assert rows["blocks.0.attn.qk_weight"].kind == "statsq" and rows["blocks.0.attn.qk_weight"].bits == 3
    assert rows["blocks.0.attn.qkx"].kind == "lsq" and rows["blocks.0.attn.qkx"].calibrated
    with pytest.raises(ValueError, match="no quantized timm Attention"):
        enable_qkr(model, W_SPEC, X_SPEC)              # already switched: nothing left to convert
