import math

import pytest
import torch

import qvit
from qvit.quantizers import create_quantizer


def test_lsq_init_and_forward_grid():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.26, 0.5, 1.2])
    q = create_quantizer({"kind": "lsq", "bits": 3}).calibrate(x)
    # s0 = 2 * mean|x| / sqrt(Qp) = 2 * (3.36 / 6) / sqrt(3)
    s = 2 * (3.36 / 6) / math.sqrt(3)
    assert q.scale.item() == pytest.approx(s)
    expected = torch.clamp(torch.round(x / s), -4, 3) * s
    torch.testing.assert_close(q(x), expected)


def test_lsq_scale_gradient_matches_formula(kernel_setting):
    fused = qvit.get_settings().fused
    q = create_quantizer({"kind": "lsq", "bits": 3})
    q.calibrate(torch.tensor([-1.0, 1.0]))  # signed data: codes [-4, 3]
    with torch.no_grad():
        q.scale.fill_(0.4)
    x = torch.tensor([-1.0, -0.4, 0.0, 0.26, 0.5, 1.3, 2.0, -1.9], requires_grad=True)
    q(x).sum().backward()
    v = [-2.5, -1.0, 0.0, 0.65, 1.25, 3.25, 5.0, -4.75]
    # inside (Qn < v < Qp): round(v) - v; beyond a bound: the bound itself (Esser et al.)
    local = [-2 + 2.5, 0.0, 0.0, 1 - 0.65, 1 - 1.25, 3.0, 3.0, -4.0]
    g = 1 / math.sqrt(len(v) * 3)
    # the compiled kernels keep round(v) - v in float16 for the backward pass
    assert q.scale.grad.item() == pytest.approx(sum(local) * g, rel=1e-3 if fused else 1e-5)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_lsq_vvtq_grad_scales():
    x = torch.tensor([0.5, -1.5, 2.0, 0.1])
    for mode, g in [("vvtq_weight", 1 / math.sqrt(4.1 * 3)), ("vvtq_act", 1 / (math.sqrt(4) * 3)), ("none", 1.0)]:
        q = create_quantizer({"kind": "lsq", "bits": 3, "grad_scale": mode}).calibrate(x)
        assert float(q.grad_factor(x)) == pytest.approx(g, rel=1e-5)


def test_lsq_plus_offset_gradient_and_init():
    x = torch.tensor([-0.2, 0.0, 0.4, 1.0])
    q = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False}).calibrate(x)
    assert q.code_range() == (0, 3)
    assert q.scale.item() == pytest.approx(0.4) and q.offset.item() == pytest.approx(-0.2)
    # (x - beta) / s = [0, 0.5, 1.5, 3] -> round half to even [0, 0, 2, 3]
    torch.testing.assert_close(q(x), torch.tensor([-0.2, -0.2, 0.6, 1.0]))
    xs = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    q(xs).sum().backward()
    g = 1 / math.sqrt(3 * 3)
    assert q.offset.grad.item() == pytest.approx(2 * g)  # 1 for each clipped input
    assert xs.grad.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(q.dequantize(q.quantize(x)), q(x))


def test_lsq_plus_lsq_init_centres_the_grid_on_signed_data():
    x = torch.tensor([-1.0, -0.5, 0.5, 2.0])                     # mean|x| = 1
    q = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False, "init": "lsq"}).calibrate(x)
    # signed 2-bit LSQ: s = 2 * 1 / sqrt(1), codes 0..3 stand for -2..1 steps
    assert q.signed and q.scale.item() == pytest.approx(2.0) and q.offset.item() == pytest.approx(-4.0)
    torch.testing.assert_close(q(torch.tensor([-5.0, -1.2, 0.9, 3.5])), torch.tensor([-4.0, -2.0, 0.0, 2.0]))
    # unsigned data (or signed: false) keeps LSQ's unsigned grid: s = 2 * mean|x| / sqrt(3), no offset
    u = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False, "init": "lsq"})
    u.calibrate(torch.tensor([0.0, 0.5, 1.0, 2.5]))
    assert not u.signed and u.offset.item() == 0.0 and u.scale.item() == pytest.approx(2 / math.sqrt(3))
    f = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False, "init": "lsq", "signed": False})
    assert f.calibrate(x).offset.item() == 0.0


def test_lsq_init_factors_are_options():
    x = torch.tensor([0.0, 0.5, 1.0, 2.5])                       # unsigned, mean|x| = 1
    u = create_quantizer({"kind": "lsq", "bits": 2, "signed": False, "init": "lsq", "unsigned_factor": 4})
    assert u.calibrate(x).scale.item() == pytest.approx(4 / math.sqrt(3))          # OFQ's unsigned init
    p = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False, "init": "lsq", "unsigned_factor": 4})
    assert p.calibrate(x).scale.item() == pytest.approx(4 / math.sqrt(3)) and p.offset.item() == 0.0
    s = create_quantizer({"kind": "lsq_plus", "bits": 3, "symmetric": False, "init": "lsq", "factor": 3,
                          "unsigned_factor": 4}).calibrate(-x)   # signed data: factor, Qp = 3
    assert s.scale.item() == pytest.approx(3 / math.sqrt(3)) and s.offset.item() == pytest.approx(-4 * s.scale.item())
    assert create_quantizer(s.config()).init_options == {"factor": 3.0, "unsigned_factor": 4.0}
    with pytest.raises(TypeError, match="unsigned_factor"):
        create_quantizer({"kind": "lsq", "bits": 2, "init": "lsq", "min_ratio": 0.1})
    with pytest.raises(ValueError, match="positive"):
        create_quantizer({"kind": "lsq", "bits": 2, "init": "lsq", "factor": 0})


@pytest.mark.parametrize("offset_grad, factor", [("scaled", 1 / math.sqrt(3 * 3)), ("unscaled", 1.0)])
def test_lsq_plus_offset_gradient_scaling_is_an_option(offset_grad, factor):
    q = create_quantizer({"kind": "lsq_plus", "bits": 2, "symmetric": False, "offset_grad": offset_grad})
    q.calibrate(torch.tensor([-0.2, 0.0, 0.4, 1.0]))              # s = 0.4, beta = -0.2
    xs = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)       # two clipped inputs, one inside
    q(xs).sum().backward()
    assert q.offset.grad.item() == pytest.approx(2 * factor)
    # the step size keeps LSQ's scaling either way: clipped levels 0 and 3, round(1.25) - 1.25 inside
    assert q.scale.grad.item() == pytest.approx((0 + (1 - 1.25) + 3) / math.sqrt(3 * 3))
    assert create_quantizer(q.config()).offset_grad == offset_grad
    with pytest.raises(ValueError, match="offset_grad"):
        create_quantizer({"kind": "lsq_plus", "bits": 2, "offset_grad": "half"})


def test_lsq_scale_is_trainable_parameter_in_state_dict():
    q = create_quantizer({"kind": "lsq", "bits": 4, "granularity": "channel", "axis": 0})
    q.calibrate(torch.randn(3, 8))
    assert isinstance(q.scale, torch.nn.Parameter) and q.scale.shape == (3,)
    fresh = create_quantizer(q.config())
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.scale, q.scale)
