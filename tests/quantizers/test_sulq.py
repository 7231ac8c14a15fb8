"""Tests for the ``sulq`` (shift-uniform-log2, I&S-ViT) post-softmax quantizer."""
import math

import pytest
import torch
import torch.nn as nn

from qvit.quantizers import NotCalibratedError, create_quantizer
from qvit.quantizers.sulq import CODE_ETA_GRID, PAPER_ETA_GRID, SULQQuantizer
from tests.helpers import rebuild_and_compare, softmax_data


def make(bits=2, **kw):
    return create_quantizer(dict(kind="sulq", bits=bits, **kw))


# ---------------------------------------------------------------------------------------------- hand grids
def test_paper_2bit_hand_grid():
    # η = 1/8: y = log2(x + 1/8) spans [-3, 0], step 1, levels 2^(k-3) - 1/8 = 0, 1/8, 3/8, 7/8
    x = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.875])
    q = make(2, eta_grid=[0.125]).calibrate(x)
    assert q.minv.tolist() == [-3.0] and q.maxv.tolist() == [0.0]
    # (y + 3) = 0, .49, .85, 1.38, 1.77, 2.32, 2.54, 3
    assert q.quantize(x).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert q.fake_quant(x).tolist() == [0.0, 0.0, 0.125, 0.125, 0.375, 0.375, 0.875, 0.875]
    assert q.levels().tolist() == [[0.0, 0.125, 0.375, 0.875]]
    assert q.code_range() == (0, 3) and q.n_levels == 4


def test_paper_3bit_hand_grid():
    # η = 2^-7: y spans [-7, 0], step 1, levels (2^k - 1) / 128
    x = torch.tensor([0.0, 0.005, 0.02, 0.1, 0.3, 0.6, 0.9921875])
    q = make(3, eta_grid=[2 ** -7]).calibrate(x)
    # (y + 7) = 0, .71, 1.83, 3.79, 5.30, 6.28, 7
    assert q.quantize(x).tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert (q.fake_quant(x) * 128).tolist() == [0.0, 1.0, 3.0, 15.0, 31.0, 63.0, 127.0]


def test_code_2bit_hand_grid():
    # same data, reference-code forward: step (0 - -3) / 4 = 0.75, k in 0..4 (5 levels),
    # exponents -3, -2.25, -1.5, -0.75, 0 rounded (half to even) to -3, -2, -2, -1, 0
    x = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.875])
    q = make(2, mode="code", eta_grid=[0.125]).calibrate(x)
    # (y + 3) / 0.75 = 0, .65, 1.13, 1.84, 2.35, 3.09, 3.38, 4
    assert q.quantize(x).tolist() == [0, 1, 1, 2, 2, 3, 3, 4]
    assert q.fake_quant(x).tolist() == [0.0, 0.125, 0.125, 0.125, 0.125, 0.375, 0.375, 0.875]
    assert q.levels().tolist() == [[0.0, 0.125, 0.125, 0.375, 0.875]]


def test_code_mode_off_by_one():
    x = softmax_data((2, 4, 32, 32))
    for bits in (2, 3, 4):
        code, paper = make(bits, mode="code").calibrate(x), make(bits).calibrate(x)
        assert code.code_range() == (0, 2 ** bits) and code.n_levels == 2 ** bits + 1
        assert paper.code_range() == (0, 2 ** bits - 1) and paper.n_levels == 2 ** bits
        assert int(code.quantize(x).max()) == 2 ** bits  # the observed maximum lands on the extra code
        assert int(paper.quantize(x).max()) == 2 ** bits - 1
        assert code.levels().shape == (1, 2 ** bits + 1)


def test_code_mode_has_few_distinct_values():
    x = softmax_data((2, 4, 32, 32))
    for bits in (4, 8):
        code = make(bits, mode="code").calibrate(x)
        assert code.fake_quant(x).unique().numel() <= 11
    paper = make(4).calibrate(x)
    assert paper.fake_quant(x).unique().numel() >= 14
    assert make(8).calibrate(x).fake_quant(x).unique().numel() > 100


# ---------------------------------------------------------------------------------------------- η search
def test_eta_search_recovers_exact_shift_paper():
    # data exactly on the 2-bit paper grid of η = 0.1: x_k = 2^(log2(0.1) (1 - k/3)) - 0.1
    e = math.log2(0.1)
    x = torch.tensor([2 ** (e * (1 - k / 3)) - 0.1 for k in range(4)] * 3)
    q = make(2, eta_grid=CODE_ETA_GRID).calibrate(x)
    assert float(q.eta) == pytest.approx(0.1)
    assert float((q(x) - x).abs().max()) < 1e-6


def test_eta_search_recovers_exact_shift_code():
    # η = 0.5 and 2 bits: log2(x + 0.5) in {-1, 0, 1, 2} is on the integer grid the code's search rounds to
    x = torch.tensor([0.0, 0.5, 1.5, 3.5, 0.5, 1.5])
    q = make(2, mode="code").calibrate(x)
    assert float(q.eta) == 0.5
    err, _, _ = q.search_error(x.reshape(-1, 1), 0.5)
    assert float(err) == 0.0


def test_eta_search_is_argmin_of_independent_mse():
    x = softmax_data((2, 2, 16, 16), seed=7)
    cols = x.reshape(-1, 1)
    for mode, grid, bits in (("paper", PAPER_ETA_GRID, 3), ("code", CODE_ETA_GRID, 4)):
        errs = []
        for eta in grid:
            y = torch.log(cols + eta) / torch.log(torch.tensor(2.0)) if mode == "code" else torch.log2(cols + eta)
            lo, hi = y.min(), y.max()
            step = (hi - lo) / (2 ** bits - 1)
            e = torch.clamp(torch.round((y - lo) / step), 0, 2 ** bits - 1) * step + lo
            e = torch.round(e) if mode == "code" else e
            errs.append(float((2 ** e - eta - cols).pow(2).mean()))
        q = make(bits, mode=mode).calibrate(x)
        assert q.search_grid == grid
        assert float(q.eta) == pytest.approx(grid[errs.index(min(errs))])


def test_range_min_eta():
    x = softmax_data((2, 4, 32, 32), seed=3)
    q = make(4, range_min="eta").calibrate(x)
    assert float(q.minv) == pytest.approx(math.log2(float(q.eta)))
    assert abs(float(q.fake_quant(torch.zeros(1)))) < 1e-7


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_roundtrip_and_range(mode, bits):
    x = softmax_data((2, 4, 32, 32), seed=bits)
    q = make(bits, mode=mode).calibrate(x)
    codes = q.quantize(x)
    lo, hi = q.code_range()
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert torch.equal(q.dequantize(codes), q.fake_quant(x))
    assert torch.equal(q(x), q.fake_quant(x))


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_ste_gradient(mode):
    q = make(3, mode=mode, eta_grid=[0.125]).calibrate(torch.tensor([0.0, 0.5]))
    x = torch.tensor([0.0, 0.1, 0.3, 0.5, 3.0], requires_grad=True)
    out = q.fake_quant(x)
    out.sum().backward()
    # straight through both roundings in the log domain: d x̂/dx = (x̂ + η) / (x + η) strictly inside the range;
    # 0 at its bounds (x = 0 and the calibrated maximum 0.5) and beyond it
    expected = (out.detach() + 0.125) / (x.detach() + 0.125)
    expected[[0, 3, 4]] = 0.0
    assert 0.9 < float(expected[1]) < 1.2 and 0.9 < float(expected[2]) < 1.2
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=0)


def test_eta_is_a_parameter_frozen_unless_learned():
    x = softmax_data((2, 4, 32, 32), seed=2)
    frozen = make(4).calibrate(x)
    assert isinstance(frozen.eta, nn.Parameter) and not frozen.eta.requires_grad
    assert "eta" in frozen.state_dict() and "minv" in frozen.state_dict() and "maxv" in frozen.state_dict()
    learned = make(4, learn_eta=True).calibrate(x)
    assert learned.eta.requires_grad
    learned(x).pow(2).sum().backward()
    assert learned.eta.grad is not None and torch.isfinite(learned.eta.grad).all()
    assert float(learned.eta.grad.abs()) > 0


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_state_dict_roundtrip_and_config(mode):
    x = softmax_data((2, 4, 8, 8), seed=1)
    q = make(3, mode=mode, granularity="group", axis=1, group_size=2, learn_eta=True).calibrate(x)
    fresh = rebuild_and_compare(q, softmax_data((2, 4, 8, 8), seed=2))
    assert type(fresh) is SULQQuantizer
    assert fresh.eta.shape == (2,) and fresh.minv.shape == (2,) and fresh.eta.requires_grad


def test_headwise_groups():
    logits = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    x = (logits * torch.tensor([0.2, 1.0, 5.0]).view(1, 3, 1, 1)).softmax(-1)
    q = make(4, granularity="group", axis=1, group_size=1).calibrate(x)
    assert q.eta.shape == (3,)
    out = q(x)
    for h in range(3):
        ref = make(4).calibrate(x[:, h])
        assert torch.equal(q.eta[h:h + 1].detach(), ref.eta.detach())
        assert torch.equal(q.maxv[h:h + 1], ref.maxv) and torch.equal(q.minv[h:h + 1], ref.minv)
        assert torch.equal(out[:, h], ref(x[:, h]))


def test_invalid_settings():
    with pytest.raises(ValueError, match="mode"):
        make(4, mode="exact")
    with pytest.raises(ValueError, match="range_min"):
        make(4, range_min="zero")
    with pytest.raises(ValueError, match="range_min"):
        make(4, mode="code", range_min="eta")
    for bad in ([], [0.0], [-0.1, 0.5], [float("nan")]):
        with pytest.raises(ValueError, match="eta_grid"):
            make(4, eta_grid=bad)
    with pytest.raises(ValueError, match="learn_eta"):
        make(4, learn_eta="yes")
    with pytest.raises(ValueError, match="init"):
        make(4, init="percentile")
    with pytest.raises(ValueError, match="signed"):
        make(4, signed=True)
    with pytest.raises(ValueError, match="bits"):
        make(9)
    with pytest.raises(ValueError, match="non-negative"):
        make(4).calibrate(torch.tensor([-0.1, 0.5]))
    with pytest.raises(NotCalibratedError):
        make(4)(torch.rand(4))
