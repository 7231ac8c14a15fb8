import timm
import torch
import torch.nn as nn
from timm.layers import Conv2dSame
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention

import qvit
from qvit.nn import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention, quant_class_for
from qvit.quantizers import QuantSpec


def _disabled():
    return {"input": QuantSpec(enabled=False), "weight": QuantSpec(enabled=False)}


def test_quant_linear_and_conv_are_float_when_sites_disabled():
    lin, conv = nn.Linear(8, 4), nn.Conv2d(3, 5, 3, padding=1)
    x, img = torch.randn(2, 8), torch.randn(2, 3, 6, 6)
    ref_l, ref_c = lin(x), conv(img)
    QuantLinear.convert(lin, _disabled())
    QuantConv2d.convert(conv, _disabled())
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)
    assert torch.equal(lin(x), ref_l) and torch.equal(conv(img), ref_c)


def test_quant_linear_uses_quantized_weight():
    lin = nn.Linear(4, 2)
    QuantLinear.convert(lin, {"input": QuantSpec(enabled=False), "weight": QuantSpec(bits=2)}, name="fc")
    lin.weight_quantizer.calibrate(lin.weight.detach())
    x = torch.randn(3, 4)
    expected = x @ lin.weight_quantizer(lin.weight).t() + lin.bias
    torch.testing.assert_close(lin(x), expected)
    assert lin.weight_quantizer.site == "fc.weight"


def test_explicit_attention_matches_fused_attention(monkeypatch):
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    ref = attn(x)  # timm's fused (SDPA) path
    QuantAttention.convert(attn, {s: QuantSpec(enabled=False) for s in ("q", "k", "v", "probs")})
    fused_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    assert fused_calls == [1]              # every attention site in float: the fused kernel runs
    attn.tap = lambda module, name, t: None
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    assert fused_calls == [1]              # tapped: the explicit q·kᵀ, softmax and probs·v
    attn.tap = None
    attn.probs_quantizer = qvit.quantizers.create_quantizer(QuantSpec(bits=8))
    attn.probs_quantizer.enabled = False
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    assert fused_calls == [1]              # a disabled quantizer keeps the explicit path (toggling stays exact)


def test_window_attention_matches_with_shift_mask():
    wa = WindowAttention(16, num_heads=2, window_size=2).eval()
    x = torch.randn(3, 4, 16)
    mask = torch.zeros(3, 4, 4)
    mask[1, 0, 3] = -100.0
    ref = wa(x, mask)
    QuantWindowAttention.convert(wa, {s: QuantSpec(enabled=False) for s in ("q", "k", "v", "probs")})
    torch.testing.assert_close(wa(x, mask), ref, atol=1e-5, rtol=1e-5)


def test_attention_probs_site_quantizes_softmax_output():
    attn = Attention(16, num_heads=2).eval()
    specs = {s: QuantSpec(enabled=False) for s in ("q", "k", "v")}
    specs["probs"] = QuantSpec(bits=2, symmetric=True, signed=False)
    QuantAttention.convert(attn, specs)
    seen = []
    attn.probs_quantizer.register_forward_hook(lambda m, i, o: seen.append(o))
    attn.probs_quantizer.calibrate_lazily = True
    attn(torch.randn(1, 5, 16))
    levels = torch.unique(seen[0])
    assert len(levels) <= 4  # a 2-bit grid


def test_registry_skips_subclasses_that_change_forward():
    assert quant_class_for(nn.Linear(2, 2)) is QuantLinear
    assert quant_class_for(Conv2dSame(3, 3, 3)) is None  # its forward pads dynamically
    assert quant_class_for(nn.ReLU()) is None


def test_restore_float_round_trip():
    model = timm.create_model("test_vit").eval()
    x = torch.randn(1, 3, 160, 160)
    ref = model(x)
    qvit.prepare(model, dict(weight={"enabled": False}, activation={"enabled": False},
                             roles={"attn.probs": {"enabled": False}, "stem.input": {"enabled": False},
                                    "stem.weight": {"enabled": False}, "head.input": {"enabled": False},
                                    "head.weight": {"enabled": False}}))
    assert isinstance(model.blocks[0].attn, QuantAttention)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    qvit.unprepare(model)
    assert type(model.blocks[0].attn) is Attention
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
