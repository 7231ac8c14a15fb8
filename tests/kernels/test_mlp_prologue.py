"""QuantMlp on the kernel backend: in training the activation runs inside fc2's kernels; same values and gradients,
less stored."""
import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

import qvit
from qvit.nn import QuantMlp
from qvit.kernels import mlp_prologue

from .test_recompute import _grads


def _mlp(act_layer=nn.GELU, drop: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    act = {"kind": "lsq_plus", "bits": 3, "symmetric": False, "granularity": "tensor", "init": "minmax"}
    model = qvit.prepare(nn.Sequential(nn.Identity(), Mlp(12, 24, act_layer=act_layer, drop=drop), nn.Identity()),
                         {"overrides": {"*.input": act, "*.weight": {"kind": "lsq", "bits": 3, "init": "minmax"}}})
    qvit.calibrate(model, [torch.randn(16, 5, 12)], progress=False)
    return model.train()


@pytest.mark.parametrize("act_layer,name", [(nn.GELU, "gelu"), (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
                                            (nn.ReLU, "relu")])
def test_the_activation_inside_fc2_gives_the_plain_values_and_gradients(act_layer, name):
    model = _mlp(act_layer)
    mlp = model[1]
    assert isinstance(mlp, QuantMlp) and mlp_prologue(mlp) == name
    x = torch.randn(4, 5, 12)
    out_f, gx_f, g_f = _grads(model, x, True)
    out_p, gx_p, g_p = _grads(model, x, False)         # timm's forward, the eager kernels through autograd
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-6)
    assert {"1.fc2.input_quantizer.scale", "1.fc2.input_quantizer.offset"} <= set(g_f)
    for n in g_p:
        torch.testing.assert_close(g_f[n], g_p[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_activation_output_is_not_stored():
    model = _mlp()
    x = torch.randn(8, 50, 12)

    def saved(fused: bool) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with qvit.settings(recompute=fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x.clone().requires_grad_(True))
        out.sum().backward()
        return sum(seen.values())
    activation = 8 * 50 * 24 * 4                 # [B, N, hidden] float32
    assert saved(False) - saved(True) >= activation


def test_timm_forward_runs_when_the_fusion_would_change_something():
    model = _mlp(drop=0.1)
    assert mlp_prologue(model[1]) is None                      # dropout between the layers is active
    model[1].drop1.p = 0.0
    assert mlp_prologue(model[1]) == "gelu"
    handle = model[1].act.register_forward_hook(lambda m, a, o: o)  # a hook must see the activation
    assert mlp_prologue(model[1]) is None
    handle.remove()
    model.eval()
    assert mlp_prologue(model[1]) is None                      # inference: nothing to recompute
    model.train()
    with torch.no_grad():
        assert mlp_prologue(model[1]) is None
    assert mlp_prologue(_mlp(nn.SiLU)[1]) is None              # no kernel for this activation
