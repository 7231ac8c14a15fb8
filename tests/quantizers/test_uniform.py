import pytest
import torch

from qvit.quantizers import NotCalibratedError, QuantSpec, create_quantizer


def test_symmetric_grid_by_hand():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.26, 0.5, 1.2])
    q = create_quantizer(QuantSpec(bits=3, symmetric=True)).calibrate(x)
    # signed 3-bit: codes [-4, 3]; s = max(|min| * 3/4, max) / 3 = 1.2 / 3 = 0.4
    assert q.scale.item() == pytest.approx(0.4)
    assert q.code_range() == (-4, 3)
    assert q.quantize(x).tolist() == [-2, -1, 0, 1, 1, 3]
    torch.testing.assert_close(q(x), torch.tensor([-0.8, -0.4, 0.0, 0.4, 0.4, 1.2]))


def test_asymmetric_grid_by_hand():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.26, 0.5, 1.2])
    q = create_quantizer(QuantSpec(bits=2, symmetric=False)).calibrate(x)
    # 2-bit unsigned codes [0, 3]; s = 2.2 / 3; z = round(1 / s) = round(1.3636) = 1
    s = 2.2 / 3
    assert q.scale.item() == pytest.approx(s)
    assert q.zero_point.item() == 1
    # x / s = [-1.36, -0.55, 0, 0.35, 0.68, 1.64] -> round [-1, -1, 0, 0, 1, 2] -> + z
    assert q.quantize(x).tolist() == [0, 0, 1, 1, 2, 3]
    torch.testing.assert_close(q(x), torch.tensor([-s, -s, 0.0, 0.0, s, 2 * s]))
    torch.testing.assert_close(q.dequantize(q.quantize(x)), q(x))


def test_unsigned_symmetric_uses_full_range():
    x = torch.tensor([0.0, 0.1, 0.5, 1.0])
    q = create_quantizer(QuantSpec(bits=2, symmetric=True)).calibrate(x)
    assert q.signed is False and q.code_range() == (0, 3)
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 2 / 3, 1.0]))


def test_per_channel_and_per_group_scales():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [0.1, 0.2, -0.3, 0.4]])
    q = create_quantizer(QuantSpec(bits=8, granularity="channel", axis=0)).calibrate(w)
    # signed 8-bit [-128, 127]: s = max(|min| / 128, max / 127) per row
    torch.testing.assert_close(q.scale, torch.tensor([2.0 / 128, 0.4 / 127]))
    g = create_quantizer(QuantSpec(bits=8, granularity="group", axis=1, group_size=2)).calibrate(w)
    # groups: columns {0, 1} (min -2.0, max 1.0) and {2, 3} (min -0.3, max 0.5)
    torch.testing.assert_close(g.scale, torch.tensor([2.0 / 128, 0.5 / 127]))
    assert (g(w) - w).abs().max() <= g.scale.max() / 2 + 1e-6


def test_ste_gradient_inside_and_zero_outside():
    q = create_quantizer(QuantSpec(bits=4, symmetric=False))
    q.calibrate(torch.tensor([0.0, 1.0]))
    x = torch.tensor([-0.5, 0.25, 0.5, 0.9, 1.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_percentile_and_mse_ranges():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10000), torch.tensor([50.0])])
    mm = create_quantizer(QuantSpec(bits=4, init="minmax")).calibrate(x)
    pc = create_quantizer(QuantSpec(bits=4, init="percentile", options={"percentile": 99.9})).calibrate(x)
    ms = create_quantizer(QuantSpec(bits=4, init="mse")).calibrate(x)
    assert pc.scale < mm.scale / 5 and ms.scale < mm.scale / 5
    err = {n: ((q(x) - x) ** 2).mean() for n, q in dict(mm=mm, pc=pc, ms=ms).items()}
    assert err["ms"] <= err["pc"] * 1.05 and err["ms"] < err["mm"]


def test_mse_search_finds_known_minimiser():
    # Uniform data on [-1, 1] at 8 bits: clipping is never better than the full range.
    x = torch.linspace(-1, 1, 20001)
    q = create_quantizer(QuantSpec(bits=8, init="mse", options={"num_candidates": 20})).calibrate(x)
    assert q.scale.item() == pytest.approx(1.0 / 127, rel=1e-4)


def test_uncalibrated_raises_and_lazy_init():
    q = create_quantizer(QuantSpec(bits=4))
    with pytest.raises(NotCalibratedError, match="never calibrated"):
        q(torch.ones(3))
    q.calibrate_lazily = True
    assert bool(q.calibrated) is False
    q(torch.tensor([-1.0, 1.0]))
    assert bool(q.calibrated)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="bits"):
        create_quantizer({"bits": 9})
    with pytest.raises(KeyError, match="unknown quantizer kind"):
        create_quantizer({"kind": "nonsense"})
    with pytest.raises(TypeError, match="unexpected options"):
        create_quantizer({"kind": "uniform", "percentile": 99.0})  # minmax takes no percentile
    with pytest.raises(ValueError, match="NaN"):
        create_quantizer({}).calibrate(torch.tensor([0.0, float("nan")]))


def test_zero_scale_in_state_dict_is_rejected():
    q = create_quantizer({"bits": 4}).calibrate(torch.tensor([-1.0, 1.0]))
    sd = q.state_dict()
    sd["scale"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="invalid scale"):
        create_quantizer({"bits": 4}).load_state_dict(sd)


def test_state_dict_round_trip_resizes_per_channel_buffers():
    w = torch.randn(6, 5)
    q = create_quantizer({"bits": 4, "granularity": "channel", "axis": 0}).calibrate(w)
    fresh = create_quantizer(q.config())
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))


def test_minmax_is_exact_beyond_the_sample_cap(monkeypatch):
    import qvit.quantizers.base as base
    monkeypatch.setattr(base, "MAX_OBSERVED_ELEMENTS", 64)
    q = create_quantizer(QuantSpec(bits=8, symmetric=False))
    for i in range(10):
        batch = torch.rand(100)
        if i == 3:
            batch[17] = 7.0  # one extreme value in an early batch
        q.observe(batch)
    assert sum(c.numel() for c in q._observed) <= 64
    q.finalize()
    assert q.scale.item() == pytest.approx(7.0 / 255)


def test_reset_forgets_detected_signedness():
    q = create_quantizer(QuantSpec(bits=4)).calibrate(torch.tensor([0.0, 1.0]))
    assert q.signed is False
    q.reset()
    assert q.signed is None
    q.calibrate(torch.tensor([-1.0, 1.0]))
    assert q.signed is True and q.code_range() == (-8, 7)


def test_num_groups_splits_the_axis_into_equal_blocks():
    """``num_groups: 3`` on a qkv-like weight gives one scale per q, k and v row block whatever the width."""
    w = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), -4.0), torch.full((2, 3), 0.5)])  # [6, 3]
    q = create_quantizer(QuantSpec(bits=8, granularity="group", axis=0, num_groups=3)).calibrate(w)
    torch.testing.assert_close(q.scale, torch.tensor([1.0 / 127, 4.0 / 128, 0.5 / 127]))
    torch.testing.assert_close(q(w), w)
    assert q.config()["num_groups"] == 3 and q.granularity_label == "3groups"
    assert create_quantizer(q.config()).num_groups == 3
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        create_quantizer(QuantSpec(bits=8, granularity="group", axis=0, num_groups=3)).calibrate(torch.randn(4, 2))
    with pytest.raises(ValueError, match="num_groups"):
        QuantSpec(granularity="group", num_groups=0)


def test_bad_group_size_is_a_clear_error():
    q = create_quantizer(QuantSpec(bits=4, granularity="group", group_size=3))
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        q.calibrate(torch.randn(2, 4))


def test_lsq_without_zero_point_rejects_asymmetric():
    with pytest.raises(ValueError, match="lsq_plus"):
        create_quantizer({"kind": "lsq", "symmetric": False})


def test_mse_range_on_the_symmetric_absmax_grid_with_a_margin():
    from qvit.quantizers.ranges import mse_range
    cols = torch.tensor([[-0.3], [0.0], [0.2], [1.0]])
    lo, hi = mse_range(cols, num_candidates=100, min_ratio=0.01, margin=0.5, absmax=True)
    # Nagel et al.'s grid: k/100 of max|x| + 0.5 = 1.5, symmetric because the data has a negative value
    k = torch.arange(1, 101, dtype=torch.float32).unsqueeze(1)
    torch.testing.assert_close(hi, 0.015 * k)
    torch.testing.assert_close(lo, -0.015 * k)
    lo, hi = mse_range(cols.abs(), num_candidates=100, min_ratio=0.01, margin=0.5, absmax=True)
    assert (lo == 0).all()                       # one-sided data keeps zero as its lower end
    torch.testing.assert_close(hi, 0.015 * k)
    lo, hi = mse_range(cols, num_candidates=3, margin=0.5)      # without absmax each side widens on its own
    torch.testing.assert_close(hi[-1], torch.tensor([1.5]))
    torch.testing.assert_close(lo[-1], torch.tensor([-0.8]))
    with pytest.raises(ValueError, match="margin"):
        mse_range(cols, margin=-1.0)


def test_mse_init_on_the_absmax_grid_is_the_brute_force_argmin():
    torch.manual_seed(0)
    x = torch.randn(4000) ** 3          # heavy tails: the best clip is well inside the range
    spec = QuantSpec(bits=2, init="mse", options=dict(min_ratio=0.01, margin=0.5, absmax=True))
    q = create_quantizer(spec).calibrate(x)
    # by hand: signed 2-bit codes [-2, 1], threshold t = k/100 * (max|x| + 0.5), step t / 1
    top = float(x.abs().max()) + 0.5
    errs = [((torch.clamp(torch.round(x / t), -2, 1) * t - x) ** 2).sum() for t in (k * top / 100 for k in range(1, 101))]
    best = (int(torch.stack(errs).argmin()) + 1) * top / 100
    assert q.scale.item() == pytest.approx(best, rel=1e-5)
