import pytest
import torch

from qvit.quantizers import create_quantizer
from qvit.quantizers.pow2 import Pow2Quantizer

UNIT = torch.tensor([-1.0, 0.5, 1.0])  # calibrates s = 1 with init="minmax"


def make(bits, **kw):
    return Pow2Quantizer(bits, **kw).calibrate(UNIT)


X3 = torch.tensor([1.0, -0.8, 0.72, 0.6, 0.36, -0.18, 0.15, 0.1, 0.05, 0.0, 1.5])


def test_hand_grid_3bit_zero_free():
    # levels {1, 0.5, 0.25, 0.125}
    log = make(3, projection="log")
    assert torch.equal(log(X3), torch.tensor([1.0, -1.0, 1.0, 0.5, 0.5, -0.25, 0.125, 0.125, 0.125, 0.125, 1.0]))
    assert torch.equal(log.quantize(X3), torch.tensor([3, -4, 3, 2, 2, -2, 0, 0, 0, 0, 3], dtype=torch.int32))
    lin = make(3, projection="linear")
    # 0.72 -> 0.5 (0.22 < 0.28), 0.36 -> 0.25 (0.11 < 0.14), -0.18 -> -0.125 (0.055 < 0.07): differ from log
    assert torch.equal(lin(X3), torch.tensor([1.0, -1.0, 0.5, 0.5, 0.25, -0.125, 0.125, 0.125, 0.125, 0.125, 1.0]))
    assert torch.equal(lin.quantize(X3), torch.tensor([3, -4, 2, 2, 1, -1, 0, 0, 0, 0, 3], dtype=torch.int32))


def test_hand_grid_3bit_with_zero():
    # levels {1, 0.5, 0.25} and 0; log: 0 below s * 2^-2.5 = 0.177, linear: 0 below 0.125
    log = make(3, projection="log", zero_free=False)
    assert torch.equal(log(X3), torch.tensor([1.0, -1.0, 1.0, 0.5, 0.5, -0.25, 0.0, 0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(log.quantize(X3), torch.tensor([3, -3, 3, 2, 2, -1, 0, 0, 0, 0, 3], dtype=torch.int32))
    lin = make(3, projection="linear", zero_free=False)
    assert torch.equal(lin(X3), torch.tensor([1.0, -1.0, 0.5, 0.5, 0.25, -0.25, 0.25, 0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(lin.quantize(X3), torch.tensor([3, -3, 2, 2, 1, -1, 1, 0, 0, 0, 3], dtype=torch.int32))


X2 = torch.tensor([1.0, 0.8, 0.72, 0.6, 0.3, -0.1, 0.0, -2.0])


def test_hand_grid_2bit():
    # zero-free: levels {1, 0.5}
    assert torch.equal(make(2, projection="log")(X2), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, -0.5, 0.5, -1.0]))
    assert torch.equal(make(2, projection="log").quantize(X2),
                       torch.tensor([1, 1, 1, 0, 0, -1, 0, -2], dtype=torch.int32))
    assert torch.equal(make(2, projection="linear")(X2), torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, -0.5, 0.5, -1.0]))
    # with zero: ternary {-1, 0, 1}; log: 0 below 2^-0.5 = 0.707, linear: 0 below 0.5
    assert torch.equal(make(2, zero_free=False)(X2), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
    assert torch.equal(make(2, zero_free=False, projection="linear")(X2),
                       torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0]))
    assert make(2, zero_free=False).code_range() == (-1, 1)


def test_scale_per_channel_from_range():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.25, 0.1, -0.2]])
    q = Pow2Quantizer(3, granularity="channel", axis=0).calibrate(w)
    assert torch.equal(q.scale, torch.tensor([2.0, 0.25]))
    assert torch.equal(q(w), torch.tensor([[0.5, -2.0, 1.0], [0.25, 0.125, -0.25]]))


def test_gradient_pass_through_inside_only():
    q = make(3)
    x = torch.tensor([-1.5, -0.5, 0.2, 0.99, 1.2], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_free", [True, False])
@pytest.mark.parametrize("projection", ["log", "linear"])
def test_codes_roundtrip(bits, zero_free, projection):
    torch.manual_seed(bits)
    w = torch.randn(6, 32)
    w[0, :4] = 0.0
    q = Pow2Quantizer(bits, zero_free=zero_free, projection=projection, granularity="channel", axis=0).calibrate(w)
    codes = q.quantize(w)
    lo, hi = q.code_range()
    assert codes.dtype == torch.int32 and codes.min() >= lo and codes.max() <= hi
    out = q.fake_quant(w)
    assert torch.equal(q.dequantize(codes), out)
    if zero_free:
        assert (out != 0).all()
        assert (lo, hi) == (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    # every code is a distinct level and the layout is monotone in the value
    levels = q.dequantize(torch.arange(lo, hi + 1).reshape(-1, 1).expand(-1, 6).t())
    assert (levels[:, 1:] > levels[:, :-1]).all()


@pytest.mark.parametrize("init, options", [("percentile", {}), ("mse", {"num_candidates": 20})])
def test_other_range_estimators(init, options):
    torch.manual_seed(0)
    x = torch.randn(2000)
    x[0] = 40.0
    q = Pow2Quantizer(4, init=init, **options).calibrate(x)
    assert create_quantizer(q.config()).config() == q.config()
    assert 0 < float(q.scale) <= 40.0
    err = (q(x) - x).pow(2).mean()
    assert err <= (make(4)(x / 40.0) * 40.0 - x).pow(2).mean() + 1e-6


def test_state_dict_and_config_roundtrip():
    torch.manual_seed(1)
    w = torch.randn(5, 7)
    q = Pow2Quantizer(4, zero_free=False, projection="linear", granularity="channel", axis=0).calibrate(w)
    fresh = Pow2Quantizer(4, zero_free=False, projection="linear", granularity="channel", axis=0)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))
    assert torch.equal(fresh.dequantize(q.quantize(w)), q.fake_quant(w))
    rebuilt = create_quantizer(q.config())
    assert type(rebuilt) is Pow2Quantizer and rebuilt.config() == q.config()
    rebuilt.load_state_dict(q.state_dict())
    assert torch.equal(rebuilt(w), q(w))


def test_invalid_settings():
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            create_quantizer({"kind": "pow2", "bits": bits})
        with pytest.raises(ValueError, match="bits"):
            Pow2Quantizer(bits)
    with pytest.raises(ValueError, match="projection"):
        Pow2Quantizer(4, projection="nearest")
    with pytest.raises(TypeError, match="unexpected"):
        create_quantizer({"kind": "pow2", "bits": 4, "exponent_bits": 3})
    with pytest.raises(ValueError, match="init"):
        Pow2Quantizer(4, init="statsq")
    with pytest.raises(ValueError, match="symmetric"):
        Pow2Quantizer(4, symmetric=False)
    with pytest.raises(ValueError, match="sign"):
        Pow2Quantizer(4, signed=False)
