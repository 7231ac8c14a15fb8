"""PTQ4ViT's interval search and the ``ptq4vit`` recipe."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import qvit
from qvit.ptq import quantizers_enabled
from qvit.ptq.interval_search import capture, find_search_ops, interval_search

def _weight_only_linear(out_features: int, weight: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, out_features))
    spec = {"kind": "uniform", "bits": 3, "symmetric": True, "signed": True, "init": "minmax", **weight}
    # a lone layer is both stem and head (8-bit by default): the overrides pin the spec under test
    return qvit.prepare(model, {"overrides": {"*.input": {"enabled": False}, "*.weight": spec}})


def _brute_force_scales(linear: nn.Linear, x: torch.Tensor, groups: int, num_candidates: int = 100,
                        alpha: float = 0.01, beta: float = 1.2) -> torch.Tensor:
    """Per row block, the grid step with the lowest output squared error (3-bit signed, ties: first)."""
    w = linear.weight.detach()
    ref = F.linear(x, w, linear.bias)
    rows = w.shape[0] // groups
    best = []
    for g in range(groups):
        block = slice(g * rows, (g + 1) * rows)
        d0 = w[block].abs().max() / 3.5                     # max|w| / (2^(k-1) - 1/2), k = 3
        errs = []
        for i in range(num_candidates + 1):
            s = d0 * (alpha + i * (beta - alpha) / num_candidates)
            wq = w.clone()
            wq[block] = torch.clamp(torch.round(w[block] / s), -4, 3) * s
            errs.append((F.linear(x, wq, linear.bias) - ref)[:, block].pow(2).sum())
        i = int(torch.stack(errs).argmin())
        best.append(d0 * (alpha + i * (beta - alpha) / num_candidates))
    return torch.stack(best)


def test_weight_search_returns_the_grid_minimiser():
    model = _weight_only_linear(4, {"granularity": "tensor"})
    x = torch.randn(64, 8)
    interval_search(model, x, metric="mse", rounds=1, progress=False)
    expected = _brute_force_scales(model[0], x, groups=1)
    torch.testing.assert_close(model[0].weight_quantizer.scale, expected)


def test_qkv_style_groups_are_searched_independently():
    """``num_groups: 3`` (q, k, v row blocks): each block's step is its own minimiser, whatever the others."""
    model = _weight_only_linear(6, {"granularity": "group", "axis": 0, "num_groups": 3})
    with torch.no_grad():
        model[0].weight[2:4] *= 10     # blocks with very different ranges
        model[0].weight[4:6] *= 0.1
    x = torch.randn(64, 8)
    interval_search(model, x, metric="mse", rounds=1, progress=False)
    scale = model[0].weight_quantizer.scale
    assert scale.shape == (3,)
    torch.testing.assert_close(scale, _brute_force_scales(model[0], x, groups=3))


def test_captured_gradient_is_the_task_loss_gradient():
    """The Hessian metric weights output errors by ∂L/∂O with L = CE(logits, own top-1): for the last layer
    ∂L/∂O = softmax(O) - onehot(argmax O)."""
    torch.manual_seed(0)
    model = qvit.prepare(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)),
                         {"weight": {"symmetric": True}, "activation": {"symmetric": True}})
    x = torch.randn(10, 8)
    ops = find_search_ops(model)
    assert [op.name for op in ops] == ["0", "2"]
    data = capture(model, ops, x, gradients=True, batch_size=4)
    with torch.no_grad(), quantizers_enabled(model, weights=False, acts=False):
        hidden = model[1](model[0](x))
        logits = model[2](hidden)
    expected = logits.softmax(-1) - F.one_hot(logits.argmax(-1), 5)
    torch.testing.assert_close(data["2"]["grad"], expected)
    torch.testing.assert_close(data["2"]["a"], hidden)   # the float input of the last layer
    assert data["0"]["grad"].shape == (10, 16)


def test_unsupported_granularities_are_clear_errors():
    model = qvit.prepare(nn.Sequential(nn.Linear(8, 4)),
                         {"weight": {"symmetric": True}, "activation": {"symmetric": True, "granularity": "channel"}})
    with pytest.raises(ValueError, match="per tensor only"):
        interval_search(model, torch.randn(16, 8), metric="mse", progress=False)
    asym = _weight_only_linear(4, {"symmetric": False})
    with pytest.raises(ValueError, match="symmetric"):
        interval_search(asym, torch.randn(16, 8), metric="mse", progress=False)
    with pytest.raises(ValueError, match="metric"):
        interval_search(asym, torch.randn(16, 8), metric="kl", progress=False)


def test_ptq4vit_recipe_on_test_vit():
    """Head-wise twin-uniform softmax and the Hessian-guided search: lower total output error than the initial
    max-based steps, and closer to the float model than the min-max baseline at W4A4 (fixed seed)."""
    fp = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        ref = fp(x)
    recipe = qvit.recipes.load_recipe("ptq4vit").quick_variant()
    q = qvit.quantize_ptq(fp, recipe, x, w_bits=4, a_bits=4, progress=False)
    probs = q.blocks[0].attn.probs_quantizer
    assert probs.kind == "twin_uniform" and probs.split.numel() == fp.blocks[0].attn.num_heads
    assert torch.equal(torch.log2(probs.split), torch.round(torch.log2(probs.split)))   # power-of-two split
    assert q.blocks[0].attn.qkv.weight_quantizer.scale.numel() == 3
    ops = next(r for r in qvit.quant_state(q).log if "ops" in r)["ops"]
    assert {r["kind"] for r in ops} == {"conv", "linear", "qk", "pv"}
    assert sum(r["final_error"] for r in ops) < sum(r["initial_error"] for r in ops)
    base = qvit.quantize_ptq(fp, "minmax", x, w_bits=4, a_bits=4, progress=False)
    with torch.no_grad():
        err = {name: ((m(x) - ref).norm() / ref.norm()).item() for name, m in (("ptq4vit", q), ("minmax", base))}
    assert err["ptq4vit"] < err["minmax"]


def test_attention_tap_sees_operands_without_changing_the_output():
    model = qvit.prepare(timm.create_model("test_vit", img_size=64).eval(), {"w_bits": 8, "a_bits": 8})
    x = torch.randn(2, 3, 64, 64)
    qvit.calibrate(model, x, progress=False)
    attn = model.blocks[0].attn
    seen = {}
    with torch.no_grad():
        ref = model(x)
        attn.tap = lambda m, name, t: seen.setdefault(name, t.shape)
        out = model(x)
        attn.tap = None
    assert torch.equal(out, ref)
    heads = attn.num_heads
    assert set(seen) == {"q", "k", "logits", "probs", "v", "context"}
    assert seen["probs"][1] == heads and seen["logits"] == seen["probs"]
