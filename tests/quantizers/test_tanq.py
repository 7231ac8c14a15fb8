"""Tests for the ``tanq`` (tangent companding) post-softmax quantizer."""
import math

import pytest
import torch

from qvit.quantizers import NotCalibratedError, create_quantizer
from qvit.quantizers.tanq import ALPHA_GRID, TanQQuantizer, tan_compress, tan_expand
from tests.helpers import rebuild_and_compare, softmax_data


def make(bits=2, **kw):
    return create_quantizer(dict(kind="tanq", bits=bits, **kw))


# ---------------------------------------------------------------------------------------------- hand grids
def test_levels_alpha_two_thirds_2bit():
    # θ = π/3, tan θ = √3; u = 1/3, 2/3 -> atan(∓√3/3) = ∓π/6 -> x = 1/2 ∓ (π/6) / (2π/3) = 1/4, 3/4
    q = make(2, alpha=2 / 3).calibrate(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(q.levels(), torch.tensor([[0.0, 0.25, 0.75, 1.0]]), rtol=0, atol=1e-6)
    assert q.levels()[0, 0].item() == 0.0 and q.levels()[0, -1].item() == 1.0


def test_fake_quant_alpha_two_thirds_2bit():
    # 3 g(x) = 0, .31, .54, 1.11, 1.48, 1.52, 2.13, 2.69, 3 -> codes 0, 0, 1, 1, 1, 2, 2, 3, 3
    x = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.49, 0.51, 0.8, 0.95, 1.0])
    q = make(2, alpha=2 / 3).calibrate(x)
    assert q.quantize(x).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    expected = torch.tensor([0.0, 0.0, 0.25, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0])
    torch.testing.assert_close(q.fake_quant(x), expected, rtol=0, atol=1e-6)


def test_levels_alpha_half():
    # θ = π/4, tan θ = 1: x_k = 1/2 + (2/π) atan(2k/K - 1)
    q2 = make(2, alpha=0.5).calibrate(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(q2.levels(), torch.tensor([[0.0, 0.29516724, 0.70483276, 1.0]]), rtol=0, atol=1e-6)
    q3 = make(3, alpha=0.5).calibrate(torch.tensor([0.0, 1.0]))
    expected = [0.0, 0.10513691, 0.24223788, 0.40966553, 0.59033447, 0.75776212, 0.89486309, 1.0]
    torch.testing.assert_close(q3.levels(), torch.tensor([expected]), rtol=0, atol=1e-6)


def test_fake_quant_alpha_half_3bit():
    # 7 g(x) = 0, .32, .60, .96, 1.72, 2.66, 3.5 (tie -> 4, half to even), 4.17, 5.28, 6.04, 6.68, 7
    x = torch.tensor([0.0, 0.03, 0.06, 0.1, 0.2, 0.35, 0.5, 0.62, 0.8, 0.9, 0.97, 1.0])
    q = make(3, alpha=0.5).calibrate(x)
    assert q.quantize(x).tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7]
    expected = torch.tensor([0.0, 0.0, 0.10513691, 0.10513691, 0.24223788, 0.40966553, 0.59033447, 0.59033447,
                             0.75776212, 0.89486309, 1.0, 1.0])
    torch.testing.assert_close(q.fake_quant(x), expected, rtol=0, atol=1e-6)


def test_compander_inverse():
    x = torch.linspace(0, 0.6, 61)
    for a in ALPHA_GRID:
        alpha, s = torch.tensor(a), torch.tensor(0.6)
        u = tan_compress(x, alpha, s)
        assert float(u.min()) == 0.0 and float(u.max()) == 1.0
        torch.testing.assert_close(tan_expand(u, alpha, s), x, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------- the stated property
@pytest.mark.parametrize("bits", range(2, 9))
def test_more_levels_near_one_than_log2(bits):
    log2 = create_quantizer(dict(kind="log2", bits=bits)).calibrate(torch.tensor([0.0, 1.0]))  # Δ = 1
    log2_levels = log2.dequantize(torch.arange(log2.code_range()[1] + 1))
    n_log2 = int((log2_levels >= 0.5).sum())
    assert n_log2 == 2  # Δ and Δ/2
    for a in ALPHA_GRID:  # every α in (0, 1): the grid is symmetric about 1/2 with no level on it
        levels = make(bits, alpha=a).calibrate(torch.tensor([0.0, 1.0])).levels()[0]
        n_tanq = int((levels >= 0.5).sum())
        assert n_tanq == 2 ** (bits - 1)
        if bits == 2:
            assert n_tanq == n_log2
        else:
            assert n_tanq > n_log2


def test_alpha_crowds_levels_at_both_ends():
    gaps = []
    for a in ALPHA_GRID:
        levels = make(4, alpha=a).calibrate(torch.tensor([0.0, 1.0])).levels()[0]
        top, bottom = float(levels[-1] - levels[-2]), float(levels[1] - levels[0])
        assert top < 1 / 15 and math.isclose(top, bottom, rel_tol=1e-4)  # finer than uniform, symmetric
        gaps.append(top)
    assert gaps == sorted(gaps, reverse=True)


# ---------------------------------------------------------------------------------------------- calibration
def test_alpha_search_picks_lowest_mse():
    x = softmax_data((2, 4, 16, 16), seed=5)
    q = make(3).calibrate(x)
    assert float(q.alpha) in [pytest.approx(a) for a in ALPHA_GRID]
    errs = {a: float((make(3, alpha=a).calibrate(x)(x) - x).pow(2).mean()) for a in ALPHA_GRID}
    best = min(errs, key=errs.get)
    assert float(q.alpha) == pytest.approx(best)
    assert float(q.scale) == 1.0


def test_custom_alpha_grid_and_calibrated_scale():
    x = torch.tensor([0.0, 0.1, 0.2, 0.6])
    q = make(2, alpha_grid=[0.3, 0.6], scale=None).calibrate(x)  # minmax: s = max = 0.6
    assert q.scale.tolist() == [pytest.approx(0.6)]
    assert float(q.alpha) in (pytest.approx(0.3), pytest.approx(0.6))
    assert q.levels()[0, -1].item() == q.scale.item()


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("bits,kw", [(2, {}), (4, {"scale": None, "init": "percentile"}), (8, {"alpha": 0.9})])
def test_codes_roundtrip_and_range(bits, kw):
    x = softmax_data()
    q = make(bits, **kw).calibrate(x)
    codes = q.quantize(x)
    lo, hi = q.code_range()
    assert (lo, hi) == (0, 2 ** bits - 1) and codes.dtype == torch.int32
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert torch.equal(q.dequantize(codes), q.fake_quant(x))
    assert torch.equal(q(x), q.fake_quant(x))


def test_ste_gradient():
    q = make(3, scale=0.5).calibrate(torch.tensor([0.0, 0.5]))
    x = torch.tensor([0.0, 0.01, 0.2, 0.49, 0.5, 0.7, 1.0], requires_grad=True)
    q.fake_quant(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_state_dict_roundtrip_and_config():
    x = softmax_data((2, 4, 8, 8), seed=1)
    q = make(3, granularity="group", axis=1, group_size=2, scale=None).calibrate(x)
    fresh = rebuild_and_compare(q, softmax_data((2, 4, 8, 8), seed=2))
    assert type(fresh) is TanQQuantizer
    assert fresh.alpha.shape == (2,) and fresh.scale.shape == (2,)


def test_headwise_groups():
    logits = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    x = (logits * torch.tensor([0.2, 1.0, 5.0]).view(1, 3, 1, 1)).softmax(-1)
    q = make(4, granularity="group", axis=1, group_size=1, scale=None).calibrate(x)
    assert q.alpha.shape == (3,)
    out = q(x)
    for h in range(3):
        ref = make(4, scale=None).calibrate(x[:, h])
        assert torch.equal(q.alpha[h:h + 1], ref.alpha) and torch.equal(q.scale[h:h + 1], ref.scale)
        assert torch.equal(out[:, h], ref(x[:, h]))


def test_invalid_settings():
    for bad in (0.0, 1.0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="alpha"):
            make(4, alpha=bad)
    with pytest.raises(ValueError, match="alpha_grid"):
        make(4, alpha_grid=[])
    with pytest.raises(ValueError, match="alpha"):
        make(4, alpha_grid=[0.5, 1.0])
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            make(4, scale=bad)
    with pytest.raises(ValueError, match="signed"):
        make(4, signed=True)
    with pytest.raises(ValueError, match="init"):
        make(4, init="lsq")
    with pytest.raises(ValueError, match="bits"):
        make(1)
    with pytest.raises(ValueError, match="non-negative"):
        make(4).calibrate(torch.tensor([-0.1, 0.5]))
    with pytest.raises(NotCalibratedError):
        make(4)(torch.rand(4))
    q = make(4).calibrate(torch.rand(8))
    state = q.state_dict()
    state["alpha"] = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match="alpha"):
        make(4).load_state_dict(state)
