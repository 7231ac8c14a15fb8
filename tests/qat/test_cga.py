"""OFQ's confidence-guided annealing: the mask against a hand-computed one, and the freeze/restore cycle."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.qat import ConfidenceGuidedAnnealing, confidence_mask


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
