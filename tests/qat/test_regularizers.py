"""Dampening loss and VVTQ's bin regularizer: values and gradients against their formulas."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.qat import bin_regularizer, dampening_loss


def _layer(weight: torch.Tensor, scale: float = 1.0, bits: int = 3) -> nn.Module:
    model = qvit.prepare(nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False)), {"overrides": {
        "*.input": {"enabled": False},
        "*.weight": {"kind": "uniform", "bits": bits, "symmetric": True, "signed": True, "granularity": "tensor"}}})
    with torch.no_grad():
        model[0].weight.copy_(weight)
    model[0].weight_quantizer.set_params(torch.tensor([scale]), torch.zeros(1))
    model[0].weight_quantizer.calibrated.fill_(True)
    return model


# 3-bit signed grid with step 0.5: levels -2.0 ... 1.5
W = torch.tensor([[0.2, 0.7, -0.9, 3.0], [1.3, -0.1, 0.6, -5.0]])


@pytest.mark.parametrize("aggregation", ["sum", "mean", "kernel_mean"])
def test_dampening_value_and_gradient(aggregation):
    model = _layer(W, scale=0.5)
    w = model[0].weight
    loss = dampening_loss(model, aggregation)
    wq = torch.clamp(torch.round(W / 0.5), -4, 3) * 0.5
    wc = W.clamp(-2.0, 1.5)
    d = (wq - wc) ** 2
    factor = {"sum": 1.0, "mean": 1.0 / W.numel(), "kernel_mean": 1.0 / W.shape[1]}[aggregation]
    assert loss.item() == pytest.approx(d.sum().item() * factor, rel=1e-6)
    loss.backward()
    inside = (W > -2.0) & (W < 1.5)
    expected = 2 * (wc - wq) * inside * factor
    torch.testing.assert_close(w.grad, expected)
    assert w.grad[0, 3] == 0 and w.grad[1, 3] == 0       # clipped weights get no pull


def test_dampening_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation"):
        dampening_loss(_layer(W), "median")


def test_bin_regularizer_value_and_gradient():
    model = _layer(W, scale=0.5)
    w = model[0].weight
    reg = bin_regularizer(model)
    wq = torch.clamp(torch.round(W / 0.5), -4, 3) * 0.5
    wc = W.clamp(-2.0, 1.5)
    expected = ((wq - wc) ** 2).mean()
    codes = (wq / 0.5).flatten()
    for k in codes.unique():
        members = wc.flatten()[codes == k]
        if members.numel() > 1:
            expected = expected + members.var(unbiased=True)
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)
    # gradient check against autograd of the hand formula
    w_ref = W.clone().requires_grad_(True)
    wc_ref = w_ref.clamp(-2.0, 1.5)
    ref = ((wq - wc_ref) ** 2).mean()
    for k in codes.unique():
        sel = (codes == k).reshape(W.shape)
        if int(sel.sum()) > 1:
            ref = ref + wc_ref[sel].var(unbiased=True)
    ref.backward()
    reg.backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_bin_regularizer_pulls_bins_together():
    """A gradient step on the regularizer alone lowers the spread of the weights inside each bin."""
    torch.manual_seed(0)
    model = _layer(torch.randn(8, 16) * 0.6, scale=0.5)
    w = model[0].weight
    opt = torch.optim.SGD([w], lr=0.5)
    before = bin_regularizer(model).item()
    for _ in range(5):
        opt.zero_grad()
        bin_regularizer(model).backward()
        opt.step()
    assert bin_regularizer(model).item() < 0.5 * before
