"""OFQ's confidence-guided annealing: the mask against a hand-computed one, and the freeze/restore cycle."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.qat import ConfidenceGuidedAnnealing, confidence_mask
from qvit.qat.cga import confident

from tests.helpers import statsq_test_vit


def _statsq_layer(weight: torch.Tensor) -> nn.Module:
    model = qvit.prepare(nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False)), {"overrides": {
        "*.input": {"enabled": False}, "*.weight": {"kind": "statsq", "bits": 2}}})
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def test_confidence_mask_by_hand():
    # 2 bits (n = 2): s = 2·mean|w| per row, v = clamp(w/s, -1, 1-1e-6)·2 - 0.5; thresholds at v = i + 1/2
    w = torch.tensor([[0.502, -0.499, 0.9, 0.1, -0.3, 0.7, 0.003]])
    model = _statsq_layer(w)
    q = model[0].weight_quantizer
    s = 2 * w.abs().mean()
    v = torch.clamp(w / s, -1, 1 - 1e-6) * 2 - 0.5
    r = torch.round(v)
    expected = torch.ones_like(w, dtype=torch.bool)
    for i in range(int(r.min()), int(r.max())):
        expected &= ~(((v - i) >= 0.5 - 0.01) & ((v - i) <= 0.5 + 0.01))
    mask = confidence_mask(q, model[0].weight, boundary_range=0.01)
    assert torch.equal(mask, expected)
    assert not mask[0, -1] and mask[0, :-1].all()      # only 0.003 (v ≈ -0.49) sits within 0.01 of a threshold


def test_cga_freezes_confident_weights_through_an_adamw_step():
    torch.manual_seed(0)
    model = qvit.prepare(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)), {"overrides": {
        "*.input": {"enabled": False}, "*.weight": {"kind": "statsq", "bits": 2}}})
    cga = ConfidenceGuidedAnnealing(model, boundary_range=0.05, suffixes=("0", "2"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    model(torch.randn(8, 16)).pow(2).sum().backward()
    fraction = cga.before_step()
    masks = [confidence_mask(m.weight_quantizer, m.weight, 0.05) for m in (model[0], model[2])]
    opt.step()
    cga.after_step()
    assert 0 < fraction < 0.5
    for m, w0, mask in zip((model[0], model[2]), before, masks):
        assert torch.equal(m.weight[mask], w0[mask])          # frozen: unchanged despite weight decay
        assert not torch.equal(m.weight[~mask], w0[~mask])    # the low-confidence ones trained


def test_cga_errors():
    with pytest.raises(ValueError, match="boundary_range"):
        confidence_mask(_statsq_layer(torch.randn(2, 4))[0].weight_quantizer, torch.randn(2, 4), 0.7)
    with pytest.raises(ValueError, match="no quantized weight"):
        ConfidenceGuidedAnnealing(_statsq_layer(torch.randn(2, 4)), suffixes=("fc1",))


def _qkr_vit():
    model = statsq_test_vit(w_bits=2, a_bits=4)
    with torch.no_grad():
        for blk in model.blocks:                  # no query bias: W_q and W_k then learn only through W_qk
            d = blk.attn.qkv.weight.shape[0] // 3
            blk.attn.qkv.bias[:d] = 0
    return model.train()


def test_cga_gates_the_query_key_product_gradient():
    from qvit.nn.qkr import qk_product
    model = _qkr_vit()
    x = torch.randn(2, 3, 32, 32)
    attn = model.blocks[0].attn
    hd = attn.num_heads * attn.head_dim
    cga = ConfidenceGuidedAnnealing(model, boundary_range=0.05, suffixes=("qkv",), within="blocks")
    assert [s.site for s in cga.products] == [f"blocks.{i}.attn.qk_weight" for i in range(len(model.blocks))]
    captured = {}

    def capture(module, args, out):                     # runs after the gate: the gradient of the gated output
        out.register_hook(lambda g: captured.setdefault("g", g.clone()))

    attn.qk_weight_quantizer.register_forward_hook(capture)
    model(x).pow(2).sum().backward()
    gated = attn.qkv.weight.grad[:2 * hd].clone()
    w_qk = qk_product(attn)
    mask = confidence_mask(attn.qk_weight_quantizer, w_qk, 0.05)
    assert 0 < (~mask).float().mean() < 0.5
    expected, = torch.autograd.grad(w_qk, attn.qkv.weight, captured["g"] * (~mask))
    torch.testing.assert_close(gated, expected[:2 * hd], rtol=1e-4, atol=1e-7)
    ungated, = torch.autograd.grad(qk_product(attn), attn.qkv.weight, captured["g"])
    assert not torch.allclose(gated, ungated[:2 * hd])
    assert 0 < cga.before_step() < 0.5                  # counts the gated product entries too
    cga.after_step()
    cga.gate_active = lambda: False                     # outside the CGA stage the gradient passes everywhere
    model.zero_grad()
    captured.clear()
    model(x).pow(2).sum().backward()
    full, = torch.autograd.grad(qk_product(attn), attn.qkv.weight, captured["g"])
    torch.testing.assert_close(attn.qkv.weight.grad[:2 * hd], full[:2 * hd], rtol=1e-4, atol=1e-7)
    assert not ConfidenceGuidedAnnealing(model, suffixes=("qkv",), gate_products=False).products


def test_cga_freezes_only_the_value_rows_of_a_qkr_qkv():
    model = _qkr_vit()
    attn = model.blocks[0].attn
    hd = attn.num_heads * attn.head_dim
    cga = ConfidenceGuidedAnnealing(model, boundary_range=0.05, suffixes=("qkv",), gate_products=False)
    site = next(s for s in cga.sites if s.site == "blocks.0.attn.qkv.weight")
    assert site.rows == slice(2 * hd, 3 * hd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = attn.qkv.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    mask = confident(site.grid_position(), 0.05)
    cga.before_step()
    opt.step()
    cga.after_step()
    v_now, v_before = attn.qkv.weight[2 * hd:], before[2 * hd:]
    assert torch.equal(v_now[mask], v_before[mask]) and not torch.equal(v_now[~mask], v_before[~mask])
    assert (attn.qkv.weight[:2 * hd] != before[:2 * hd]).float().mean() > 0.9     # query and key rows train freely
