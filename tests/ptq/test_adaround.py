"""AdaRound: learned rounding of the weights as a block-reconstruction option."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.ptq.adaround import GAMMA, ZETA, AdaRoundWeight, adaround, beta_at, commit
from qvit.ptq.reconstruct import reconstruct_unit


def _layer(bits: int = 3, symmetric: bool = True) -> nn.Module:
    torch.manual_seed(0)
    spec = {"kind": "uniform", "bits": bits, "symmetric": symmetric, "granularity": "channel", "axis": 0,
            "init": "minmax"}
    model = qvit.prepare(nn.Sequential(nn.Linear(16, 8)), {"overrides": {"*.input": {"enabled": False},
                                                                          "*.weight": spec}})
    qvit.calibrate(model, torch.randn(4, 16), progress=False)
    return model


@pytest.mark.parametrize("symmetric", [True, False])
def test_initial_soft_weight_is_the_float_weight_and_hard_is_on_the_grid(symmetric):
    model = _layer(symmetric=symmetric)
    layer, q = model[0], model[0].weight_quantizer
    state = AdaRoundWeight(layer)
    w = layer.weight.detach()
    scale = q.scale.reshape(-1, 1)
    zero = torch.zeros_like(scale) if symmetric else q.zero_point.reshape(-1, 1)
    qmin, qmax = q.code_range()
    clipped = scale * (torch.clamp(w / scale + zero, qmin, qmax) - zero)   # w itself, up to the grid's clipping
    torch.testing.assert_close(state.soft(), clipped, atol=1e-6, rtol=0)
    frac = w / scale - torch.floor(w / scale)
    torch.testing.assert_close(state.h(), frac, atol=1e-6, rtol=0)
    hard = state.hard()
    assert torch.equal(q(hard), hard)                                  # on the quantizer's own grid
    step = (hard - w).abs() / scale
    assert (step < 1 + 1e-5).all()                                     # floor or ceil of each weight


def test_regularizer_and_beta_schedule_match_their_formulas():
    state = AdaRoundWeight(_layer()[0])
    with torch.no_grad():
        state.V.fill_(0.0)                      # h = 0.5 (γ + (ζ-γ)/2 = 0.5): the regularizer's maximum 1 per weight
    h = torch.sigmoid(torch.tensor(0.0)) * (ZETA - GAMMA) + GAMMA
    assert abs(h.item() - 0.5) < 1e-6
    assert state.regularizer(2.0).item() == pytest.approx(state.V.numel())
    with torch.no_grad():
        state.V.fill_(10.0)                     # h = 1: rounded, no penalty
    assert state.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert [beta_at(t, 100) for t in (0, 19, 20, 60, 100)] == [20.0, 20.0, 20.0, 11.0, 2.0]


def test_adaround_beats_nearest_rounding_on_its_layer():
    model = _layer(bits=2)
    layer = model[0]
    # correlated inputs: rounding each weight to nearest is then far from the best output error
    x = torch.randn(256, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(256, 16)
    with torch.no_grad():
        y = nn.functional.linear(x, layer.weight, layer.bias)   # the float layer
        nearest = ((model(x) - y) ** 2).sum(1).mean().item()
    w0 = layer.weight.detach().clone()
    record = reconstruct_unit(layer, x, y, iters=300, lr=1e-2, batch_size=64, rounding="adaround",
                              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        learned = ((model(x) - y) ** 2).sum(1).mean().item()
    assert learned < 0.8 * nearest
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)   # committed on the grid
    assert torch.equal(layer.bias, model[0].bias) and record["params"] == w0.numel()
    scale = layer.weight_quantizer.scale.reshape(-1, 1)
    assert ((layer.weight - w0).abs() / scale < 1 + 1e-5).all()


def test_adaround_context_only_changes_weights_inside():
    model = _layer()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model(x)
    with adaround(model) as states:
        assert len(states) == 1
        with torch.no_grad():
            states[0].V.add_(5.0)               # round everything up
            inside = model(x)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after) and not torch.equal(inside, before)
    commit(states)
    with torch.no_grad():
        assert not torch.equal(model(x), before)


def test_adaround_needs_a_uniform_weight_quantizer():
    model = qvit.prepare(nn.Sequential(nn.Linear(4, 4)), {"overrides": {"*.weight": {"kind": "pow2", "bits": 4}}})
    with pytest.raises(ValueError, match="uniform weight quantizer"):
        AdaRoundWeight(model[0])
    with pytest.raises(ValueError, match="rounding"):
        reconstruct_unit(model[0], torch.randn(2, 4), torch.randn(2, 4), iters=1, rounding="nearest")


def test_reconstruct_step_with_adaround_leaves_every_block_weight_on_its_grid():
    import timm
    fp = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(8, 3, 64, 64)
    recipe = qvit.Recipe.from_dict({"name": "t", "steps": ["calibrate", {"reconstruct": {
        "iters": 3, "lr": 1e-3, "rounding": "adaround", "units": "blocks"}}]})
    q = qvit.quantize_ptq(fp, recipe, x, w_bits=4, a_bits=4, progress=False)
    block = q.blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    assert not torch.equal(q.blocks[0].mlp.fc1.weight, fp.blocks[0].mlp.fc1.weight)
    log = next(r for r in qvit.quant_state(q).log if r["step"] == "reconstruct" and "units" in r)
    assert log["rounding"] == "adaround" and all("rounded_up" in u for u in log["units"])
