"""KD losses against their formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from qvit.qat import distillation_loss, hard_and_soft_loss, soft_cross_entropy


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])           # softmax = [1/4, 3/4]
    probs = torch.tensor([[0.5, 0.5]])
    assert soft_cross_entropy(logits, probs).item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(logits, torch.ones(1, 3))


def test_distillation_loss_temperature_and_detached_teacher():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    loss = distillation_loss(s, t, temperature=2.0)
    expected = 4.0 * -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert t.grad is None                                    # the teacher gets no gradient
    # the gradient w.r.t. the student logits is T·(softmax(s/T) - softmax(t/T)) / B
    torch.testing.assert_close(s.grad, 2.0 * (F.softmax(s / 2, -1) - F.softmax(t / 2, -1)).detach() / 4)
    assert distillation_loss(t, t).item() == pytest.approx(-(F.softmax(t, -1) * F.log_softmax(t, -1)).sum(-1).mean().item())


def test_hard_and_soft_is_ce_plus_kd():
    torch.manual_seed(0)
    s, t, d = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([0, 2, 1])
    assert hard_and_soft_loss(s, y, t).item() == pytest.approx(
        (F.cross_entropy(s, y) + distillation_loss(s, t)).item())
    assert hard_and_soft_loss(s, y, t, dist_logits=d).item() == pytest.approx(
        (F.cross_entropy(s, y) + distillation_loss(d, t)).item())
