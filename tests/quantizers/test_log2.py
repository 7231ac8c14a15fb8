"""Tests for the ``log2`` and ``log_sqrt2`` post-softmax quantizers."""
import math

import pytest
import torch

from qvit.quantizers import NotCalibratedError, create_quantizer
from qvit.quantizers.log2 import Log2Quantizer, LogSqrt2Quantizer
from tests.helpers import rebuild_and_compare, softmax_data

R2 = 2 ** -0.5


def make(kind="log2", bits=2, **kw):
    return create_quantizer(dict(kind=kind, bits=bits, **kw))


# ---------------------------------------------------------------------------------------------- hand grids
def test_registered_kinds():
    assert type(make("log2")) is Log2Quantizer
    assert type(make("log_sqrt2")) is LogSqrt2Quantizer


def test_log2_2bit_hand_grid():
    # Δ = max = 1; levels 1, 1/2, 1/4, 1/8 (codes 0..3); -log2(x) rounding to >= 4 underflows to zero (code 4)
    x = torch.tensor([1.0, 0.7, 0.3, 0.2, 0.1, 0.06, 0.05, 0.0])
    q = make("log2", 2).calibrate(x)
    assert q.delta.tolist() == [1.0]
    assert q.quantize(x).tolist() == [0, 1, 2, 2, 3, 4, 4, 4]
    assert q.fake_quant(x).tolist() == [1.0, 0.5, 0.25, 0.25, 0.125, 0.0, 0.0, 0.0]
    assert q.code_range() == (0, 4) and q.n_levels == 5


def test_log2_2bit_reserve_zero_hand_grid():
    # the last code (3) now means zero: levels 1, 1/2, 1/4 only
    x = torch.tensor([1.0, 0.7, 0.3, 0.2, 0.1, 0.06, 0.05, 0.0])
    q = make("log2", 2, reserve_zero=True).calibrate(x)
    assert q.quantize(x).tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert q.fake_quant(x).tolist() == [1.0, 0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert q.code_range() == (0, 3) and q.n_levels == 4


def test_log2_3bit_hand_grid():
    # Δ = 0.5; -log2(x/Δ) = 0, .74, 2.32, 4.64, 6.64, 7.38, 8.38, 8.97 -> 0, 1, 2, 5, 7, 7, zero, zero
    x = torch.tensor([0.5, 0.3, 0.1, 0.02, 0.005, 0.003, 0.0015, 0.001])
    q = make("log2", 3).calibrate(x)
    assert q.quantize(x).tolist() == [0, 1, 2, 5, 7, 7, 8, 8]
    assert q.fake_quant(x).tolist() == [0.5, 0.25, 0.125, 0.015625, 0.00390625, 0.00390625, 0.0, 0.0]


def test_log_sqrt2_2bit_hand_grid():
    # Δ = 1; -2 log2(x) = 0, .64, 1.47, 1.72, 2.64, 3.47, 4 -> levels 1, 2^-1/2, 1/2, 2^-3/2; 4 underflows
    x = torch.tensor([1.0, 0.8, 0.6, 0.55, 0.4, 0.3, 0.25, 0.0])
    q = make("log_sqrt2", 2).calibrate(x)
    assert q.quantize(x).tolist() == [0, 1, 1, 2, 3, 3, 4, 4]
    expected = torch.tensor([1.0, R2, R2, 0.5, 0.5 * R2, 0.5 * R2, 0.0, 0.0])
    torch.testing.assert_close(q.fake_quant(x), expected, rtol=1e-6, atol=0)


def test_log_sqrt2_3bit_hand_grid():
    # Δ = 1; -2 log2(x) = 0, 3.47, 4.64, 6.64, 7.29, 7.67 -> 0, 3, 5, 7, 7, zero (code 8)
    x = torch.tensor([1.0, 0.3, 0.2, 0.1, 0.08, 0.07, 0.0])
    q = make("log_sqrt2", 3).calibrate(x)
    assert q.quantize(x).tolist() == [0, 3, 5, 7, 7, 8, 8]
    expected = torch.tensor([1.0, 0.35355339, 0.17677670, 0.08838835, 0.08838835, 0.0, 0.0])
    torch.testing.assert_close(q.fake_quant(x), expected, rtol=1e-6, atol=0)


def test_log_sqrt2_inference_form():
    q = make("log_sqrt2", 2).calibrate(torch.tensor([0.0, 1.0]))
    shift, odd, nonzero = q.shift_decomposition(torch.arange(5))
    assert shift.tolist() == [0, 1, 1, 2, 0]
    assert odd.tolist() == [0, 1, 0, 1, 0]
    assert nonzero.tolist() == [True, True, True, True, False]
    for bits in (2, 3, 4, 8):
        for reserve_zero in (False, True):
            q = make("log_sqrt2", bits, reserve_zero=reserve_zero).calibrate(torch.tensor([0.0, 0.8]))
            codes = torch.arange(q.code_range()[1] + 1)
            torch.testing.assert_close(q.dequantize_shift(codes), q.dequantize(codes), rtol=1e-6, atol=0)
            x = softmax_data(seed=bits)
            torch.testing.assert_close(q.dequantize_shift(q.quantize(x)), q.fake_quant(x), rtol=1e-6, atol=0)


def test_log2_inference_form_is_a_shift():
    q = make("log2", 3).calibrate(torch.tensor([0.0, 0.75]))
    codes = torch.arange(9)
    shift, odd, nonzero = q.shift_decomposition(codes)
    assert shift.tolist() == list(range(8)) + [0] and odd.eq(0).all()
    assert torch.equal(q.dequantize_shift(codes), q.dequantize(codes))


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("kind", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("bits,reserve_zero,init", [(2, False, "minmax"), (4, True, "percentile"), (8, False, "mse")])
def test_codes_roundtrip_and_range(kind, bits, reserve_zero, init):
    x = softmax_data()
    q = make(kind, bits, reserve_zero=reserve_zero, init=init).calibrate(x)
    codes = q.quantize(x)
    lo, hi = q.code_range()
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert torch.equal(q.dequantize(codes), q.fake_quant(x))
    assert torch.equal(q(x), q.fake_quant(x))


def test_percentile_init_picks_lowest_error_quantile():
    x = softmax_data((4, 64, 64), seed=3)
    q = make("log_sqrt2", 4, init="percentile", percentile=(99.9, 99.99, 99.999)).calibrate(x)
    cols = x.reshape(-1, 1)
    cands = torch.quantile(cols[:, 0], torch.tensor([0.999, 0.9999, 0.99999]))
    errs = [float(q._error(cols, None, c.reshape(1))) for c in cands]
    torch.testing.assert_close(q.delta, cands[errs.index(min(errs))].reshape(1))


@pytest.mark.parametrize("kind", ["log2", "log_sqrt2"])
def test_ste_gradient(kind):
    q = make(kind, 3).calibrate(torch.tensor([0.0, 0.5]))
    x = torch.tensor([0.0, 1e-6, 0.01, 0.2, 0.49, 0.5, 0.7, 1.0], requires_grad=True)
    q.fake_quant(x).sum().backward()
    # pass-through for 0 < x < Δ (including values that underflow to zero), zero at and beyond Δ and at 0
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["log2", "log_sqrt2"])
def test_state_dict_roundtrip_and_config(kind):
    x = softmax_data((2, 4, 8, 8), seed=1)
    q = make(kind, 3, reserve_zero=True, granularity="group", axis=1, group_size=2, init="percentile",
             percentile=[99.0, 99.9]).calibrate(x)
    fresh = rebuild_and_compare(q, softmax_data((2, 4, 8, 8), seed=2))
    assert fresh.delta.shape == (2,)


def test_headwise_groups():
    # heads with very different peaks: per-head Δ must equal a per-tensor quantizer calibrated on that head alone
    logits = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    x = (logits * torch.tensor([0.2, 1.0, 5.0]).view(1, 3, 1, 1)).softmax(-1)
    q = make("log_sqrt2", 4, granularity="group", axis=1, group_size=1).calibrate(x)
    assert q.delta.shape == (3,)
    out = q(x)
    for h in range(3):
        ref = make("log_sqrt2", 4).calibrate(x[:, h])
        assert torch.equal(q.delta[h:h + 1], ref.delta)
        assert torch.equal(out[:, h], ref(x[:, h]))


def test_invalid_settings():
    with pytest.raises(ValueError, match="bits"):
        make("log2", 1)
    with pytest.raises(ValueError, match="bits"):
        make("log2", 9)
    with pytest.raises(ValueError, match="signed"):
        make("log2", 4, signed=True)
    with pytest.raises(ValueError, match="reserve_zero"):
        make("log2", 4, reserve_zero="yes")
    with pytest.raises(ValueError, match="init"):
        make("log_sqrt2", 4, init="lsq")
    with pytest.raises(TypeError, match="bogus"):
        make("log2", 4, bogus=1)
    with pytest.raises(ValueError, match="non-negative"):
        make("log2", 4).calibrate(torch.tensor([-0.1, 0.5]))
    with pytest.raises(NotCalibratedError):
        make("log2", 4)(torch.rand(4))


def test_signed_is_false_after_calibration():
    q = make("log2", 4).calibrate(softmax_data())
    assert q.signed is False and q.config()["signed"] is False
    assert math.isclose(float(q.delta), float(softmax_data().max()))
