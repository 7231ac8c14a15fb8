"""Nagel et al.'s oscillation tracker and iterative freezing, in the quantizer's integer domain."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.qat import OscillationTracker, cosine_schedule

from tests.helpers import statsq_test_vit


def _layer(weight: torch.Tensor, kind: str = "uniform") -> nn.Module:
    """A prepared 1-layer model whose 4-bit per-tensor weight quantizer has step 1 (codes = rounded weights)."""
    out_f, in_f = weight.shape
    model = qvit.prepare(nn.Sequential(nn.Linear(in_f, out_f, bias=False)), {"overrides": {
        "*.input": {"enabled": False},
        "*.weight": {"kind": kind, "bits": 4, "symmetric": True, "signed": True, "granularity": "tensor"}}})
    with torch.no_grad():
        model[0].weight.copy_(weight)
    q = model[0].weight_quantizer
    q.set_params(torch.ones(1), torch.zeros(1))
    q.calibrated.fill_(True)
    return model


def test_tracker_counts_reversals_exactly_on_a_scripted_trajectory():
    # three weights: a 0/1 oscillation, a monotone climb, one change then one reversal
    trajectory = torch.tensor([
        [0.4, 0.0, 0.4],
        [0.6, 1.0, 0.6],
        [0.4, 2.0, 0.6],
        [0.6, 3.0, 0.6],
        [0.4, 3.0, 0.4],
    ])
    model = _layer(trajectory[:1])
    tracker = OscillationTracker(model, momentum=0.5, max_bits=4)
    freq = torch.zeros(3)
    expected_rev = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]   # per step: reversal indicator
    for t, w in enumerate(trajectory):
        with torch.no_grad():
            model[0].weight.copy_(w.unsqueeze(0))
        tracker.step()
        o = torch.tensor(expected_rev[t], dtype=torch.float32)
        if t > 0:
            freq = 0.5 * o + 0.5 * freq
    state = tracker.state(tracker.weights[0])
    assert state.reversals.tolist() == [[3, 0, 1]]
    assert state.flips.tolist() == [[4, 3, 2]]
    torch.testing.assert_close(state.freq, freq.unsqueeze(0))
    stats = tracker.layer_stats()[0]
    assert stats["steps"] == 5 and stats["n"] == 3
    assert stats["reversal_hist"][:4] == [1, 1, 1, 0]            # bins 0, 1, 2-3, 4-7
    assert stats["osc_fraction"] == pytest.approx(2 / 3)        # weights 0 and 2 have f > 0.005
    assert stats["clipped_fraction"] == 0.0 and sum(stats["distance_hist"]) == 3


def test_only_optimizer_steps_count_not_forwards():
    model = _layer(torch.tensor([[0.4, 0.6]]))
    tracker = OscillationTracker(model, momentum=0.5)
    tracker.step()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.6, 0.4]]))
        for _ in range(3):
            model(torch.randn(2, 2))            # evaluation forwards: no effect on the statistics
    state = tracker.state(tracker.weights[0])
    assert int(state.steps) == 1 and int(state.flips.sum()) == 0


def test_frozen_weights_stay_fixed_under_the_optimizer_with_weight_decay():
    model = _layer(torch.tensor([[0.4, 2.2]]))
    tracker = OscillationTracker(model, momentum=0.5)
    w = model[0].weight
    for value in (0.4, 0.6, 0.4, 0.6):           # weight 0 oscillates: f = 0.5 then 0.75 after reversals
        with torch.no_grad():
            w[0, 0] = value
        tracker.step()
    tracker.freeze_threshold = 0.3
    tracker.step()                               # freezes weight 0 at round(EMA of its code)
    state = tracker.state(tracker.weights[0])
    assert state.frozen.tolist() == [[True, False]]
    frozen_latent = w[0, 0].item()
    frozen_code = state.frozen_int[0, 0].item()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        out = model(torch.ones(1, 2)).sum()
        out.backward()
        assert w.grad[0, 0] == 0.0 and w.grad[0, 1] != 0.0   # no gradient reaches the frozen weight
        opt.step()
        tracker.step()
        assert w[0, 0].item() == frozen_latent             # weight decay undone for the frozen weight
        assert model[0].weight_quantizer(w)[0, 0].item() == frozen_code
    assert w[0, 1].item() != 2.2                           # the free weight trained
    stats = tracker.layer_stats()[0]
    assert stats["frozen_fraction"] == 0.5


def test_freezing_decides_in_the_crossing_step_at_the_ema_from_before_it():
    # m = 0.5, threshold 0.3, freezing on from the first step. Latent weights 6.1, 5.9, 0.2, 1.1 (step 1: codes
    # 6, 6, 0, 1). Code EMA (initialised at the first code): 6 -> 6 -> 0.5·0 + 0.5·6 = 3. At step 3 the code
    # reverses (down 6 -> 0, then up 0 -> 1): f = 0.5 > 0.3 in that step, so the weight freezes at round(3) = 3,
    # the EMA before that step's update (which would give 0.5·1 + 0.5·3 = 2, the value a rule deciding one step
    # later freezes at).
    model = _layer(torch.tensor([[6.1, 2.0]]))
    tracker = OscillationTracker(model, momentum=0.5)
    tracker.freeze_threshold = 0.3
    w = model[0].weight
    state = tracker.state(tracker.weights[0])
    for t, value in enumerate((6.1, 5.9, 0.2, 1.1)):
        with torch.no_grad():
            w[0, 0] = value
        tracker.step()
        assert state.frozen[0, 0].item() == (t == 3)
    assert state.freq[0, 0].item() == pytest.approx(0.5)
    assert state.frozen_int[0, 0].item() == 3.0
    assert state.frozen_weight[0, 0].item() == pytest.approx(1.1)
    assert state.ema_int[0, 0].item() == pytest.approx(2.0)
    assert model[0].weight_quantizer(w)[0, 0].item() == 3.0          # the next forward uses the frozen code
    # step 4: the optimizer moved the latent weight; it is put back, the forward's code goes 1 -> 3 (no reversal,
    # f = 0.25 < 0.3: the frozen code is not re-assigned) and the EMA takes the frozen code: 0.5·3 + 0.5·2 = 2.5
    with torch.no_grad():
        w[0, 0] = -4.0
    tracker.step()
    assert w[0, 0].item() == pytest.approx(1.1)
    assert state.freq[0, 0].item() == pytest.approx(0.25)
    assert state.frozen_int[0, 0].item() == 3.0 and state.ema_int[0, 0].item() == pytest.approx(2.5)
    assert not state.frozen[0, 1] and int(state.reversals[0, 1]) == 0     # the steady weight never froze


def test_commit_frozen_writes_the_frozen_codes_into_the_weights_for_export(tmp_path):
    from qvit.export import load_quantized, save_quantized
    from qvit.qat import commit_frozen
    model = _layer(torch.tensor([[6.1, 2.0]]))
    tracker = OscillationTracker(model, momentum=0.5)
    tracker.freeze_threshold = 0.3
    for value in (6.1, 5.9, 0.2, 1.1):          # freezes weight 0 at code 3 (see the test above)
        with torch.no_grad():
            model[0].weight[0, 0] = value
        tracker.step()
    x = torch.tensor([[1.0, -2.0]])
    with torch.no_grad():
        before = model(x)
        assert before.tolist() == [[3.0 - 4.0]]                 # frozen code 3, free weight code 2
    assert commit_frozen(model) == 1
    assert model[0].weight[0, 0].item() == 3.0
    with torch.no_grad():
        assert torch.equal(model(x), before)
    loaded = load_quantized(save_quantized(model, tmp_path / "m.safetensors"), nn.Sequential(nn.Linear(2, 1, bias=False)))
    with torch.no_grad():
        assert torch.equal(loaded(x), before)                    # the packed file has no tracker: the code is in W


def test_freezing_state_round_trips_through_the_state_dict():
    model = _layer(torch.tensor([[0.4, 0.6]]))
    tracker = OscillationTracker(model, momentum=0.5)
    for value in (0.4, 0.6, 0.4):
        with torch.no_grad():
            model[0].weight[0, 0] = value
        tracker.step()
    sd = model.state_dict()
    assert "0.weight_quantizer.oscillation.freq" in sd
    fresh = _layer(torch.zeros(1, 2))
    OscillationTracker(fresh, momentum=0.5)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh[0].weight_quantizer.oscillation.freq, model[0].weight_quantizer.oscillation.freq)


def test_tracker_works_in_the_lsq_integer_domain_and_skips_8bit_layers():
    model = _layer(torch.tensor([[0.4, 0.6]]), kind="lsq")
    tracker = OscillationTracker(model)
    tracker.step()
    assert tracker.layer_stats()[0]["bits"] == 4
    with pytest.raises(ValueError, match="at most 2 bits"):
        OscillationTracker(model, max_bits=2)


def test_qkr_tracks_the_rounded_values_only_and_never_freezes_them():
    from qvit.nn.qkr import qk_product
    model = statsq_test_vit(w_bits=2, a_bits=4)
    tracker = OscillationTracker(model, momentum=0.5)
    attn = model.blocks[0].attn
    hd = attn.num_heads * attn.head_dim
    sites = {s.site: s for s in tracker}
    qkv, prod = sites["blocks.0.attn.qkv.weight"], sites["blocks.0.attn.qk_weight"]
    assert tracker.state(qkv).freq.shape == (hd, attn.qkv.weight.shape[1])      # the value rows only
    assert tracker.state(prod).freq.shape == qk_product(attn).shape
    tracker.freeze_threshold = 1e-9
    w = attn.qkv.weight
    before = w.detach().clone()
    delta = 0.3 * before.std() * torch.randn_like(before)
    for sign in (1, -1, 1, -1):                  # move the weights back and forth: product codes reverse
        with torch.no_grad():
            w.copy_(before + sign * delta)
        tracker.step()
    assert int(tracker.state(prod).reversals.sum()) > 0 and int(tracker.state(qkv).reversals.sum()) > 0
    assert not tracker.state(qkv).frozen.any() and not tracker.state(prod).frozen.any()
    assert any(r["site"] == "blocks.0.attn.qk_weight" for r in tracker.layer_stats())


def test_cosine_schedule():
    assert cosine_schedule(0, 100, 0.1, 0.01) == 0.0          # off for the first 25 %
    assert cosine_schedule(25, 100, 0.1, 0.01) == pytest.approx(0.1)
    assert cosine_schedule(100, 100, 0.1, 0.01) == pytest.approx(0.01)
    assert cosine_schedule(62, 100, 0.1, 0.01) == pytest.approx(0.01 + 0.045 * (1 + __import__("math").cos(
        __import__("math").pi * 37 / 75)))
