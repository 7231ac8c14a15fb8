import pytest
import torch

from qvit.quantizers import QuantSpec, create_quantizer
from qvit.quantizers.statsq import StatsQQuantizer

# rows: mean|W| = 1 (s = 2) and 0.25 (s = 0.5)
W = torch.tensor([[0.5, -1.5, 0.25, 1.75],
                  [0.1, 0.2, -0.3, 0.4]])


def test_hand_grid_2bit_per_row():
    q = StatsQQuantizer(2)
    # row 0: k = round(W/2 * 2 - 0.5) = [0, -2, 0, 1] -> (k + 0.5);  row 1: k = [0, 0, -2, 1] -> 0.25 (k + 0.5)
    expected = torch.tensor([[0.5, -1.5, 0.5, 1.5],
                             [0.125, 0.125, -0.375, 0.375]])
    assert torch.equal(q(W), expected)
    assert torch.equal(q.quantize(W), torch.tensor([[0, -2, 0, 1], [0, 0, -2, 1]], dtype=torch.int32))
    assert torch.equal(q.scale, torch.tensor([2.0, 0.5]))


def test_hand_grid_3bit_per_row():
    q = StatsQQuantizer(3)
    # row 0: W/2*4 - 0.5 = [0.5, -3.5, 0, 3] -> k = [0, -4, 0, 3] (half to even) -> 0.5 (k + 0.5)
    # row 1: [0.3, 1.1, -2.9, 2.7] -> k = [0, 1, -3, 3] -> 0.125 (k + 0.5)
    expected = torch.tensor([[0.25, -1.75, 0.25, 1.75],
                             [0.0625, 0.1875, -0.3125, 0.4375]])
    assert torch.equal(q(W), expected)
    assert torch.equal(q.quantize(W), torch.tensor([[0, -4, 0, 3], [0, 1, -3, 3]], dtype=torch.int32))


def test_hand_grid_per_tensor():
    q = StatsQQuantizer(2, granularity="tensor")
    # s = 2 * mean|W| = 1.25, levels 0.625 * (k + 0.5)
    expected = torch.tensor([[0.3125, -0.9375, 0.3125, 0.9375],
                             [0.3125, 0.3125, -0.3125, 0.3125]])
    assert torch.allclose(q(W), expected, rtol=0, atol=1e-7)
    assert q.scale.shape == (1,)


def test_clipping_and_identity_gradient():
    w = torch.tensor([[3.0, 0.0, 0.0, 1.0],
                      [-3.0, 0.0, 0.0, -1.0]], requires_grad=True)  # s = 2 for both rows
    q = StatsQQuantizer(2)
    out = q(w)
    assert torch.equal(out.detach(), torch.tensor([[1.5, 0.5, 0.5, 0.5], [-1.5, 0.5, 0.5, -1.5]]))
    g = torch.arange(8.0).reshape(2, 4)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)  # identity everywhere, clipped +-3 included


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "tensor", "group"])
def test_codes_roundtrip_and_zero_free(bits, granularity):
    torch.manual_seed(bits)
    w = torch.randn(8, 16) * torch.rand(8, 1)
    q = StatsQQuantizer(bits, granularity=granularity, group_size=2)
    codes = q.quantize(w)
    lo, hi = q.code_range()
    assert (lo, hi) == (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    assert codes.dtype == torch.int32 and codes.min() >= lo and codes.max() <= hi
    assert torch.equal(q.dequantize(codes), q.fake_quant(w))
    assert (q.fake_quant(w) != 0).all()
    assert torch.equal(torch.round(q.integer_domain(w)).to(torch.int32), codes)


def test_scale_recomputed_every_forward_and_recorded_in_training():
    q = StatsQQuantizer(2)
    base = q(W)
    assert torch.equal(q(W * 4), base * 4)
    assert torch.equal(q.scale, torch.tensor([8.0, 2.0]))
    q.eval()
    q(W)
    assert torch.equal(q.scale, torch.tensor([8.0, 2.0]))  # eval forward leaves the recorded scale alone


def test_quantizes_without_calibration_and_with_observing():
    q = StatsQQuantizer(3)
    assert not bool(q.calibrated)
    q.eval()
    q(W)
    assert bool(q.calibrated) and torch.equal(q.scale, torch.tensor([2.0, 0.5]))
    q2 = StatsQQuantizer(3)
    q2.observing = True
    assert q2(W) is W
    q2.finalize()
    q2.observing = False
    assert torch.equal(q2.scale, torch.tensor([2.0, 0.5]))
    assert torch.equal(q2(W), q(W))


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    q = StatsQQuantizer(3)
    codes = q.quantize(w)
    fresh = StatsQQuantizer(3)
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.calibrated) and fresh.scale.shape == (6,)
    assert torch.equal(fresh.dequantize(codes), q.fake_quant(w))
    assert torch.equal(fresh(w), q(w))


def test_config_rebuilds():
    q = StatsQQuantizer(4, granularity="group", group_size=2, axis=0)
    rebuilt = create_quantizer(q.config())
    assert type(rebuilt) is StatsQQuantizer and rebuilt.config() == q.config()
    w = torch.randn(4, 5)
    assert torch.equal(rebuilt(w), q(w))
    spec = QuantSpec(kind="statsq", bits=2, granularity="channel", axis=0, init="statsq")
    assert torch.equal(create_quantizer(spec)(W), StatsQQuantizer(2)(W))


def test_invalid_settings():
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            create_quantizer({"kind": "statsq", "bits": bits, "init": "statsq"})
        with pytest.raises(ValueError, match="bits"):
            StatsQQuantizer(bits)
    with pytest.raises(ValueError, match="init"):
        StatsQQuantizer(2, init="minmax")
    with pytest.raises(TypeError, match="unexpected"):
        create_quantizer({"kind": "statsq", "bits": 2, "init": "statsq", "percentile": 99.0})
    with pytest.raises(ValueError, match="symmetric"):
        StatsQQuantizer(2, symmetric=False)
    with pytest.raises(ValueError, match="signed"):
        StatsQQuantizer(2, signed=False)
