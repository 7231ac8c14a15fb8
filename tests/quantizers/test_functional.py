"""The reference math: uniform fake quantization and its LSQ gradients on a hand-computed grid."""
import torch

from qvit.quantizers.functional import affine_fake_quant, round_ste, straight_through, sum_to


def test_affine_fake_quant_on_a_hand_computed_grid():
    # scale 0.5, offset 0.25, codes in [-2, 1]: v = (x - 0.25) / 0.5
    x = torch.tensor([-2.0, -0.6, 0.0, 0.3, 0.5, 0.74, 2.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    offset = torch.tensor(0.25, requires_grad=True)
    out = affine_fake_quant(x, scale, offset, -2, 1, scale_grad=0.5, offset_grad=0.25)
    # v = [-4.5, -1.7, -0.5, 0.1, 0.5, 0.98, 3.5]; round half to even, clamp: [-2, -2, -0, 0, 0, 1, 1]
    assert out.tolist() == [-0.75, -0.75, 0.25, 0.25, 0.25, 0.75, 0.75]
    out.backward(torch.ones(7))
    inside = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]             # -2 < v < 1 (bounds excluded)
    assert x.grad.tolist() == inside
    # d/dscale: round(v) - v inside, the clipped code outside; times 0.5
    local = [-2.0, -2 + 1.7, 0.5, -0.1, -0.5, 1 - 0.98, 1.0]
    assert abs(scale.grad.item() - 0.5 * sum(local)) < 1e-6
    assert abs(offset.grad.item() - 0.25 * 2) < 1e-7          # 1 - inside, twice


def test_without_gradients_the_same_values_come_from_the_in_place_path():
    x = torch.linspace(-3, 3, 25)
    with torch.no_grad():
        out = affine_fake_quant(x, torch.tensor(0.4), None, -4, 3)
    assert torch.equal(out, torch.clamp(torch.round(x / 0.4), -4, 3) * 0.4)


def test_straight_through_estimators():
    x = torch.tensor([0.4, 1.6, 2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, 2.0] and x.grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    out = straight_through(x, torch.zeros(3), torch.tensor([True, False, True]))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert out.tolist() == [0.0, 0.0, 0.0] and x.grad.tolist() == [1.0, 0.0, 3.0]


def test_sum_to_reduces_broadcast_dimensions():
    g = torch.arange(24.0).reshape(2, 3, 4)
    assert sum_to(g, (3, 1)).tolist() == g.sum(dim=(0, 2)).reshape(3, 1).tolist()
    assert sum_to(g, ()).item() == g.sum().item()
