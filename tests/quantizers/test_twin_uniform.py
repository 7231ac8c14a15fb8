import pytest
import torch

from qvit.quantizers import NotCalibratedError, create_quantizer
from qvit.quantizers.twin_uniform import GELU_MIN, TwinUniformQuantizer

D1_3BIT = GELU_MIN / 4  # post-GELU negative step, 3 bits
D1_2BIT = GELU_MIN / 2


def test_softmax_hand_grid_3bit():
    q = TwinUniformQuantizer(3)
    q.set_shift(1)  # N = 4, Δ2 = 1/4, Δ1 = 1/8, R1 = [0, 0.5)
    x = torch.tensor([0.0, 0.1, 0.3, 0.45, 0.5, 0.6, 0.9, 1.0])
    assert torch.equal(q(x), torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.75, 0.75]))
    assert torch.equal(q.quantize(x), torch.tensor([0, 1, 2, 3, 6, 6, 7, 7], dtype=torch.int32))


def test_softmax_hand_grid_2bit():
    q = TwinUniformQuantizer(2)
    q.set_shift(2)  # N = 2, Δ2 = 1/2, Δ1 = 1/8, R1 = [0, 0.25)
    x = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.8])
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, 0.125, 0.125, 0.5, 0.5]))
    assert torch.equal(q.quantize(x), torch.tensor([0, 0, 1, 1, 3, 3], dtype=torch.int32))


def test_gelu_hand_grid_3bit_free_step():
    q = TwinUniformQuantizer(3, mode="gelu", pow2_ratio=False)
    q.set_delta2(0.5)  # R1: -4Δ1..-Δ1 with Δ1 = 0.16997/4; R2: 0, 0.5, 1.0, 1.5
    x = torch.tensor([-0.2, -0.1, -0.05, -0.02, 0.0, 0.3, 0.74, 1.2, 2.0])
    expected = torch.tensor([-4 * D1_3BIT, -2 * D1_3BIT, -1 * D1_3BIT, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5])
    assert torch.allclose(q(x), expected, rtol=0, atol=1e-7)
    assert torch.equal(q.quantize(x), torch.tensor([0, 2, 3, 4, 4, 5, 5, 6, 7], dtype=torch.int32))


def test_gelu_hand_grid_2bit_free_step():
    q = TwinUniformQuantizer(2, mode="gelu", pow2_ratio=False)
    q.set_delta2(1.0)  # R1: -2Δ1, -Δ1 with Δ1 = 0.16997/2; R2: 0, 1
    x = torch.tensor([-0.2, -0.1, -0.03, 0.4, 0.6, 1.7])
    expected = torch.tensor([-2 * D1_2BIT, -1 * D1_2BIT, 0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(q(x), expected, rtol=0, atol=1e-7)
    assert torch.equal(q.quantize(x), torch.tensor([0, 1, 2, 2, 3, 3], dtype=torch.int32))


def test_gelu_pow2_ratio_shift():
    q = TwinUniformQuantizer(3, mode="gelu")
    q.set_shift(2)
    assert torch.allclose(q.delta2, torch.tensor([4 * D1_3BIT]), rtol=1e-7, atol=0)
    x = torch.tensor([-0.1, 0.1, 0.3, 1.0])
    expected = torch.tensor([-2 * D1_3BIT, 1 * 4 * D1_3BIT, 2 * 4 * D1_3BIT, 3 * 4 * D1_3BIT])
    assert torch.allclose(q(x), expected, rtol=0, atol=1e-7)


def _softmax_columns():
    """Two columns whose exact grids have m = 3 (Δ1 = 1/64) and m = 5 (Δ1 = 1/256) at 4 bits."""
    r2 = torch.tensor([0.25, 0.5, 0.875])
    col0 = torch.cat([torch.arange(8.0) / 64, r2])
    col1 = torch.cat([torch.arange(8.0) / 256, r2])
    return torch.stack([col0, col1], dim=1)  # [11, 2]


def test_softmax_search_picks_exact_shift_per_column():
    x = _softmax_columns()
    q = TwinUniformQuantizer(4, granularity="channel", axis=-1).calibrate(x)
    assert torch.equal(q.shift, torch.tensor([3.0, 5.0]))
    assert torch.equal(q(x), x)


def test_softmax_search_head_wise_groups():
    cols = _softmax_columns()
    attn = torch.stack([cols[:, 0]] * 2 + [cols[:, 1]] * 2).reshape(1, 4, 11, 1).expand(2, 4, 11, 3)
    q = TwinUniformQuantizer(4, granularity="group", axis=1, group_size=2).calibrate(attn)
    assert torch.equal(q.shift, torch.tensor([3.0, 5.0]))
    assert torch.equal(q(attn), attn)
    per_head = TwinUniformQuantizer(4, granularity="channel", axis=1).calibrate(attn)
    assert torch.equal(per_head.shift, torch.tensor([3.0, 3.0, 5.0, 5.0]))


def test_gelu_search_pow2_and_linear():
    d1 = GELU_MIN / 8
    neg = -torch.arange(1.0, 9.0) * d1
    pos = torch.arange(8.0) * 4 * d1  # exactly on R2 with m = 2
    q = TwinUniformQuantizer(4, mode="gelu").calibrate(torch.cat([neg, pos]))
    assert torch.equal(q.shift, torch.tensor([2.0]))
    lin = TwinUniformQuantizer(4, mode="gelu", pow2_ratio=False)
    data = torch.cat([neg, torch.arange(8.0) * 0.3])
    lin.calibrate(data)
    assert abs(float(lin.delta2) - 0.3) < 0.005
    minmax = TwinUniformQuantizer(4, mode="gelu", pow2_ratio=False)
    minmax.set_delta2(2.1 / 7.5)
    assert (lin(data) - data).pow(2).mean() < (minmax(data) - data).pow(2).mean()


def test_replicated_code_offset_hand_3bit():
    q = TwinUniformQuantizer(3, replicate_code_offset=True)
    q.set_shift(1)  # split 0.5, Δ2 = 1/3, Δ1 = 1/6; offsets round(1.5)/3 = 2/3 below, +0.5 above
    x = torch.tensor([0.0, 0.1, 0.3, 0.45, 0.5, 0.6, 0.9, 1.0])
    expected = torch.tensor([2 / 3, 2 / 3 + 1 / 6, 2 / 3 + 2 / 6, 2 / 3 + 3 / 6, 2 / 3 + 0.5, 2 / 3 + 0.5, 1.5, 1.5])
    assert torch.allclose(q(x), expected, rtol=0, atol=1e-6)
    assert torch.equal(q.quantize(x), torch.tensor([0, 1, 2, 3, 6, 6, 7, 7], dtype=torch.int32))


def test_replicated_code_offset_matches_released_formula():
    bits, m = 4, 4
    qmax, split = 2 ** (bits - 1), 2.0 ** -m
    d_hi, d_lo = 1 / (qmax - 1), split / (qmax - 1)
    x = torch.linspace(0, 1, 1001)
    released = (torch.round(x.clamp(split, 1) / d_hi) * d_hi + torch.round(x.clamp(0, split) / d_lo) * d_lo)
    q = TwinUniformQuantizer(bits, replicate_code_offset=True)
    q.set_shift(m)
    out = q(x)
    assert torch.allclose(out, released, rtol=0, atol=1e-6)
    above = x >= split
    # x >= split gains exactly +split over the coarse grid; below split no offset at 4 bits (split * 7 < 0.5)
    assert torch.allclose(out[above], torch.round(x[above] * 7) / 7 + split, rtol=0, atol=1e-6)
    assert torch.allclose(out[~above], torch.round(x[~above] / d_lo) * d_lo, rtol=0, atol=1e-7)
    assert torch.equal(q.dequantize(q.quantize(x)), out)
    paper = TwinUniformQuantizer(bits)
    paper.set_shift(m)
    covered = x <= 7 / 8  # the paper's grid tops out at 1 - 1/N
    assert (paper(x) - x)[covered].abs().max() <= 1 / 16 + 1e-6
    assert (paper(x) - x)[covered & above].mean().abs() < (out - x)[covered & above].mean().abs() - 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kw", [dict(), dict(replicate_code_offset=True), dict(mode="gelu"),
                                dict(mode="gelu", pow2_ratio=False)])
def test_codes_roundtrip(bits, kw):
    torch.manual_seed(bits)
    if kw.get("mode") == "gelu":
        x = torch.nn.functional.gelu(torch.randn(3, 5, 8) * 2)
    else:
        x = torch.softmax(torch.randn(3, 5, 8) * 3, dim=-1)
    q = TwinUniformQuantizer(bits, granularity="channel", axis=1, **kw).calibrate(x)
    codes = q.quantize(x)
    lo, hi = q.code_range()
    assert (lo, hi) == (0, 2 ** bits - 1)
    assert codes.dtype == torch.int32 and codes.min() >= lo and codes.max() <= hi
    assert torch.equal(q.dequantize(codes), q.fake_quant(x))


def test_gradient_inside_covered_range_only():
    q = TwinUniformQuantizer(3)
    q.set_shift(1)  # covered [0, 0.75]
    x = torch.tensor([-0.1, 0.0, 0.3, 0.6, 0.7, 0.8, 1.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    g = TwinUniformQuantizer(3, mode="gelu", pow2_ratio=False)
    g.set_delta2(0.5)  # covered [-0.16997, 1.5]
    x = torch.tensor([-0.2, -0.1, 0.0, 1.4, 1.6], requires_grad=True)
    g(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("kw", [dict(), dict(replicate_code_offset=True), dict(mode="gelu", pow2_ratio=False)])
def test_state_dict_and_config_roundtrip(kw):
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(2, 4, 6, 6), dim=-1) if not kw.get("mode") else torch.nn.functional.gelu(
        torch.randn(2, 4, 6, 6))
    q = TwinUniformQuantizer(4, granularity="group", axis=1, group_size=2, **kw).calibrate(x)
    fresh = TwinUniformQuantizer(4, granularity="group", axis=1, group_size=2, **kw)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.dequantize(q.quantize(x)), q.fake_quant(x))
    rebuilt = create_quantizer(q.config())
    assert type(rebuilt) is TwinUniformQuantizer and rebuilt.config() == q.config()
    rebuilt.load_state_dict(q.state_dict())
    assert torch.equal(rebuilt(x), q(x))


def test_uncalibrated_raises():
    with pytest.raises(NotCalibratedError):
        TwinUniformQuantizer(4)(torch.rand(3))


def test_invalid_settings():
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            create_quantizer({"kind": "twin_uniform", "bits": bits, "init": "mse"})
        with pytest.raises(ValueError, match="bits"):
            TwinUniformQuantizer(bits)
    with pytest.raises(ValueError, match="mode"):
        TwinUniformQuantizer(4, mode="relu")
    with pytest.raises(ValueError, match="pow2_ratio"):
        TwinUniformQuantizer(4, mode="softmax", pow2_ratio=False)
    with pytest.raises(ValueError, match="replicate_code_offset"):
        TwinUniformQuantizer(4, mode="gelu", replicate_code_offset=True)
    with pytest.raises(ValueError, match="signed"):
        TwinUniformQuantizer(4, mode="softmax", signed=True)
    with pytest.raises(ValueError, match="init"):
        TwinUniformQuantizer(4, init="minmax")
    with pytest.raises(TypeError, match="unexpected"):
        create_quantizer({"kind": "twin_uniform", "bits": 4, "init": "mse", "num_candidates_": 3})
    with pytest.raises(ValueError, match="set_delta2"):
        TwinUniformQuantizer(4, mode="gelu", pow2_ratio=False).set_shift(2)
    with pytest.raises(ValueError, match="max_shift"):
        TwinUniformQuantizer(4, max_shift=-1)
