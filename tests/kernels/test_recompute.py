"""Backward-pass recomputation of quantized operands gives the plain path's gradients and stores less."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import qvit
from qvit.kernels.recompute import can_recompute
from qvit.qat import OscillationTracker
from qvit.recipes import load_recipe


def _linear(kind: str) -> nn.Module:
    torch.manual_seed(0)
    act = {"kind": "lsq_plus", "bits": 3, "symmetric": False, "granularity": "tensor", "init": "minmax"}
    model = qvit.prepare(nn.Sequential(nn.Linear(12, 6)), {"overrides": {
        "*.input": act, "*.weight": {"kind": kind, "bits": 3, "granularity": "channel", "axis": 0}}})
    qvit.calibrate(model, [torch.randn(16, 5, 12)], progress=False)
    return model.train()


def _grads(model: nn.Module, x: torch.Tensor, recompute: bool):
    """Output, input gradient and parameter gradients; without recomputation, the eager kernels (exact
    ``round(v) - v``, as the recomputed path's direct gradients)."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    with qvit.settings(recompute=recompute, fused=recompute):
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), named


@pytest.mark.parametrize("kind", ["lsq", "lsq_plus", "statsq"])
def test_quant_linear_gradients_match_the_plain_path(kind):
    model = _linear(kind)
    x = torch.randn(4, 5, 12)
    assert can_recompute(model[0], (model[0].input_quantizer, model[0].weight_quantizer))
    out_r, gx_r, g_r = _grads(model, x, True)
    out_p, gx_p, g_p = _grads(model, x, False)
    torch.testing.assert_close(out_r, out_p)
    torch.testing.assert_close(gx_r, gx_p, rtol=1e-5, atol=1e-6)
    assert set(g_r) == set(g_p) and {"0.weight", "0.bias", "0.input_quantizer.scale"} <= set(g_r)
    for name in g_p:
        torch.testing.assert_close(g_r[name], g_p[name], rtol=1e-5, atol=1e-6, msg=name)


def _prepared(arch: str, recipe: str = "lsq", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if arch == "swin":        # window attention with relative position bias and the shifted-window mask
        fp = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2,), num_heads=(2,),
                               window_size=4, img_size=32, num_classes=4)
    else:
        fp = timm.create_model(arch, img_size=32, num_classes=4, **kwargs)
    recipe = load_recipe(recipe)
    weight = {k: v for k, v in recipe.config["weight"].items() if k not in ("min_ratio", "margin", "absmax")}
    recipe.config = {**recipe.config, "weight": {**weight, "init": "minmax"}}                   # fast init
    model = qvit.prepare(fp, recipe.quant_config(3, 3))
    qvit.calibrate(model, [torch.randn(8, 3, 32, 32)], progress=False)
    return model.train()


@pytest.mark.parametrize("arch", ["test_vit", "swin"])
def test_whole_model_gradients_match_the_plain_path(arch):
    model = _prepared(arch)
    x = torch.randn(4, 3, 32, 32)
    out_r, _, g_r = _grads(model, x, True)
    out_p, _, g_p = _grads(model, x, False)
    torch.testing.assert_close(out_r, out_p, rtol=1e-5, atol=1e-5)
    assert set(g_r) == set(g_p)
    assert any("probs_quantizer" in n for n in g_p) and any("relative_position" in n for n in g_p) == (arch == "swin")
    for name in g_p:
        scale = g_p[name].abs().max().clamp(min=1e-6)
        # a convolution's quantizers keep round(v) - v in float16 in the fused kernels (recomputed layers: exact)
        tol = 1e-3 if "_quantizer." in name else 1e-4
        assert (g_r[name] - g_p[name]).abs().max() / scale < tol, name


def test_frozen_weights_get_no_gradient_with_recomputation():
    model = _prepared("test_vit", "nagel_freeze")
    tracker = OscillationTracker(model, max_bits=4)
    tw = tracker.weights[0]
    state = tracker.state(tw)
    state.frozen[0].fill_(True)                       # freeze the first output row of one layer
    scale = tw.quantizer.scale_tensors()["scale"].detach().view(-1, *[1] * (tw.parameter.ndim - 1))
    state.frozen_int.copy_(torch.round(tw.parameter.detach() / scale).to(state.frozen_int.dtype))
    layer = tw.layer
    assert can_recompute(layer, (layer.input_quantizer, layer.weight_quantizer))
    x = torch.randn(2, 3, 32, 32)
    out_r, _, g_r = _grads(model, x, True)
    out_p, _, g_p = _grads(model, x, False)
    torch.testing.assert_close(out_r, out_p, rtol=1e-5, atol=1e-5)
    weight_name = tw.site
    assert torch.all(g_r[weight_name][0] == 0) and torch.all(g_p[weight_name][0] == 0)
    torch.testing.assert_close(g_r[weight_name], g_p[weight_name], rtol=1e-4, atol=1e-6)


def test_observing_uninitialized_or_hooked_quantizers_fall_back():
    model = _linear("lsq")
    layer = model[0]
    qs = (layer.input_quantizer, layer.weight_quantizer)
    assert can_recompute(layer, qs)
    layer.input_quantizer.observing = True
    assert not can_recompute(layer, qs)
    layer.input_quantizer.observing = False
    layer.weight_quantizer.calibrated.fill_(False)
    assert not can_recompute(layer, qs)
    layer.weight_quantizer.calibrated.fill_(True)
    handle = layer.weight_quantizer.register_forward_hook(lambda m, a, o: o)   # unknown hook: may have effects
    assert not can_recompute(layer, qs)
    handle.remove()
    assert can_recompute(layer, qs)
    layer.eval()
    assert not can_recompute(layer, qs)
    layer.train()
    with torch.no_grad():
        assert not can_recompute(layer, qs)
    with qvit.settings(recompute=False):
        assert not can_recompute(layer, qs)
    handle = layer.weight_quantizer.register_pure_forward_hook(lambda m, a, o: o)   # declared pure: may rerun
    assert can_recompute(layer, qs)
    handle.remove()


def _saved_bytes(model: nn.Module, x: torch.Tensor, recompute: bool) -> int:
    seen, total = set(), 0

    def pack(t: torch.Tensor):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with qvit.settings(recompute=recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()         # what the forward pass keeps for the backward pass
    loss.backward()
    return total


def test_recomputation_stores_far_less_for_the_backward_pass():
    model = _prepared("test_vit", patch_size=4)     # 65 tokens: activations, not weights, dominate
    x = torch.randn(8, 3, 32, 32)
    plain = _saved_bytes(copy.deepcopy(model), x, False)
    lean = _saved_bytes(model, x, True)
    assert lean < 0.7 * plain, (lean, plain)


def test_unhooked_affine_quantizers_get_direct_gradients_and_others_their_graph():
    from qvit.kernels.recompute import _direct_args
    from qvit.quantizers import LSQPlusQuantizer
    layer = _linear("statsq")[0]
    x = torch.randn(4, 5, 12)
    args = _direct_args(layer.input_quantizer, x)
    assert args is not None and args.scale.requires_grad and args.offset is not None
    assert _direct_args(layer.weight_quantizer, layer.weight) is None            # StatsQ is not an affine grid
    handle = layer.input_quantizer.register_forward_hook(lambda m, a, o: o)      # a hook may change the output
    assert _direct_args(layer.input_quantizer, x) is None
    handle.remove()

    class Doubled(LSQPlusQuantizer):
        def fake_quant(self, x):
            return 2 * super().fake_quant(x)

    layer.input_quantizer.__class__ = Doubled      # changes fake_quant but not fake_quant_args: back to the graph
    assert _direct_args(layer.input_quantizer, x) is None
