"""The compiled fake-quantization kernels against the eager reference math."""
import warnings

import pytest
import torch

import qvit
from qvit.kernels import fused as kernels
from qvit.quantizers import functional
from qvit.quantizers.functional import FakeQuantArgs


def _run(fused, x, scale, offset, qmin, qmax, grad):
    leaves = [t for t in (x, scale, offset) if t is not None]
    for t in leaves:
        t.grad = None
    with qvit.settings(fused=fused):
        out = kernels.fake_quant(x, FakeQuantArgs(scale, offset, qmin, qmax, scale_grad=0.5, offset_grad=0.25))
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in leaves]


def _case(seed, shape, scale_shape, offset):
    """``(x, scale, offset or None, grad)``: an input spread over several grid steps and leaves that need gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).requires_grad_()
    scale = (0.3 + torch.rand(scale_shape, generator=gen)).requires_grad_()
    off = (torch.rand(scale_shape, generator=gen) - 0.5).requires_grad_() if offset else None
    return x, scale, off, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape,scale_shape", [((64, 30), ()), ((2, 5, 30), ()), ((16, 30), (16, 1)),
                                               ((2, 3, 7, 7), (1, 3, 1, 1))])
def test_fused_kernels_match_the_eager_ones(offset, shape, scale_shape):
    x, scale, off, grad = _case(0, shape, scale_shape, offset)
    eager_out, eager_grads = _run(False, x, scale, off, -8, 7, grad)
    fused_out, fused_grads = _run(True, x, scale, off, -8, 7, grad)
    assert torch.equal(fused_out, eager_out)
    assert torch.equal(fused_grads[0], eager_grads[0])                      # STE mask: exact
    # the scale gradient sums round(v) - v, kept in float16 (|error| <= 2.5e-4 per element); offsets: summation order
    torch.testing.assert_close(fused_grads[1], eager_grads[1], rtol=1e-3, atol=1e-3)
    if offset:
        torch.testing.assert_close(fused_grads[2], eager_grads[2], rtol=1e-5, atol=1e-5)


def test_fused_kernels_write_strided_inputs_densely():
    # attention's q, k, v are views into qkv: the outputs come back contiguous, values and gradients unchanged
    gen = torch.Generator().manual_seed(1)
    qkv = (3 * torch.randn(2, 5, 3, 2, 4, generator=gen)).requires_grad_()
    scale = torch.tensor(0.4, requires_grad=True)
    grad = torch.randn(2, 2, 5, 4, generator=gen)
    results = []
    for fused in (False, True):
        qkv.grad = scale.grad = None
        with qvit.settings(fused=fused):
            out = kernels.fake_quant(qkv.permute(2, 0, 3, 1, 4)[0], FakeQuantArgs(scale, None, -8, 7))
        out.backward(grad)
        results.append((out.detach(), qkv.grad.clone(), scale.grad.clone()))
    (eager_out, eager_gx, eager_gs), (fused_out, fused_gx, fused_gs) = results
    assert fused_out.is_contiguous() and torch.equal(fused_out, eager_out)
    assert torch.equal(fused_gx, eager_gx)
    torch.testing.assert_close(fused_gs, eager_gs, rtol=1e-3, atol=1e-3)
    image = torch.randn(2, 3, 4, 4, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    out = kernels.fake_quant(image, FakeQuantArgs(scale, None, -8, 7))
    assert out.is_contiguous(memory_format=torch.channels_last)       # a dense layout is kept


def test_fused_kernels_take_tensor_bounds_and_the_range_edges():
    # per-channel bounds (a uniform quantizer's qmin - zero); values exactly on a bound count as clipped
    x = torch.tensor([[-2.0, -1.0, 0.2, 1.0, 3.0], [0.0, 0.5, 1.5, 2.0, 9.0]], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    qmin, qmax = torch.tensor([[-2.0], [0.0]]), torch.tensor([[2.0], [4.0]])
    grad = torch.ones_like(x)
    eager = _run(False, x, scale, None, qmin, qmax, grad)
    fused = _run(True, x, scale, None, qmin, qmax, grad)
    assert torch.equal(fused[0], eager[0])
    assert fused[1][0].tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]]   # v = x / 0.5
    assert torch.equal(fused[1][0], eager[1][0])
    torch.testing.assert_close(fused[1][1], eager[1][1], rtol=1e-3, atol=1e-3)


def test_a_kernel_that_fails_to_compile_runs_eagerly_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")
    kernels.reset()
    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    try:
        x = torch.randn(4, 6, requires_grad=True)
        scale = torch.tensor(0.2, requires_grad=True)
        with qvit.settings(fused=True), pytest.warns(RuntimeWarning, match="_fused_forward could not be compiled"):
            out = kernels.fake_quant(x, FakeQuantArgs(scale, None, -8, 7))
        assert qvit.get_settings().fused                    # only that kernel is off, not the setting
        with qvit.settings(fused=True), pytest.warns(RuntimeWarning, match="_fused_backward could not be compiled"):
            out.sum().backward()
        with qvit.settings(fused=True), warnings.catch_warnings():
            warnings.simplefilter("error")                  # warned once per kernel
            kernels.fake_quant(x, FakeQuantArgs(scale, None, -8, 7)).sum().backward()
    finally:
        kernels.reset()
    expected = torch.clamp(torch.round(x.detach() / 0.2), -8, 7) * 0.2
    assert torch.equal(out.detach(), expected) and x.grad is not None and scale.grad is not None


@pytest.mark.parametrize("offset", [False, True])
def test_gradient_free_kernel_matches_the_eager_one_and_only_runs_while_recomputing(offset, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(2, 5, 30, generator=gen)
    scale = 0.3 + torch.rand((), generator=gen)
    off = torch.rand((), generator=gen) - 0.5 if offset else None
    calls = []
    real_run = kernels.run
    monkeypatch.setattr(kernels, "run", lambda kernel, *args: calls.append(kernel) or real_run(kernel, *args))
    args = FakeQuantArgs(scale, off, -8, 7)
    eager = functional.affine_fake_quant(x, *args)
    with qvit.settings(fused=True):
        assert torch.equal(kernels.fake_quant(x, args), eager) and calls == []
        with torch.no_grad(), kernels.recomputing():
            fused = kernels.fake_quant(x, args)
    assert calls == [kernels._fused_fake_quant] and torch.equal(fused, eager)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape,scale_shape", [((64, 30), ()), ((16, 30), (16, 1)), ((2, 3, 7, 7), (1, 3, 1, 1))])
def test_direct_gradients_equal_back_propagation_through_the_eager_kernel(fused, offset, shape, scale_shape):
    x, scale, off, grad = _case(2, shape, scale_shape, offset)
    eager_out, eager_grads = _run(False, x, scale, off, -8, 7, grad)
    with qvit.settings(fused=fused):
        _direct_gradients_match(x, scale, off, grad, shape, offset, eager_out, eager_grads)


def _direct_gradients_match(x, scale, off, grad, shape, offset, eager_out, eager_grads):
    args = FakeQuantArgs(scale, off, -8, 7, scale_grad=0.5, offset_grad=0.25)
    out, gx, gs, go = kernels.fake_quant_grads(x.detach(), grad, args, value=True, need_x=True)
    assert torch.equal(out, eager_out) and torch.equal(gx, eager_grads[0])
    torch.testing.assert_close(gs, eager_grads[1], rtol=1e-5, atol=1e-5)       # exact round(v) - v: sum order only
    assert (go is None) == (not offset)
    if offset:
        torch.testing.assert_close(go, eager_grads[2], rtol=1e-5, atol=1e-5)
    none, gx2, gs2, _ = kernels.fake_quant_grads(x.detach(), grad, args, value=False, need_x=False)
    assert none is None and gx2 is None and torch.allclose(gs2, gs, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.fake_quant_value(x, args), eager_out)
    strided = x.detach().transpose(0, -1).contiguous().transpose(0, -1)            # same values, other strides
    s_out, s_gx, s_gs, _ = kernels.fake_quant_grads(strided, grad, args, value=True, need_x=True)
    assert torch.equal(s_out, out) and torch.equal(s_gx, gx) and torch.allclose(s_gs, gs, rtol=1e-5, atol=1e-5)
    frozen = FakeQuantArgs(scale.detach(), None, -8, 7)              # fixed scale: no scale gradient
    assert kernels.fake_quant_grads(x.detach(), grad, frozen, value=False, need_x=True)[2] is None
    # written into a given buffer: the same value and gradients, the buffer returned
    buf = torch.full(shape, float("nan"))
    o_out, o_gx, o_gs, _ = kernels.fake_quant_grads(strided, grad, args, value=True, need_x=True, out=buf)
    assert o_out is buf and torch.equal(buf, out) and torch.equal(o_gx, gx) and torch.allclose(o_gs, gs, rtol=1e-5,
                                                                                                atol=1e-5)
    buf.fill_(float("nan"))
    assert kernels.fake_quant_value(strided, args, out=buf) is buf and torch.equal(buf, eager_out)


def test_a_buffer_of_the_wrong_shape_dtype_or_layout_is_refused():
    x = torch.randn(4, 6)
    args = FakeQuantArgs(torch.tensor(0.5), None, -8, 7)
    for bad in (torch.empty(6, 4), torch.empty(4, 6, dtype=torch.float64), torch.empty(6, 4).t()):
        with pytest.raises(ValueError, match="contiguous"):
            kernels.fake_quant_value(x, args, out=bad)
        with pytest.raises(ValueError, match="contiguous"):
            kernels.fake_quant_grads(x, torch.ones_like(x), args, value=True, need_x=True, out=bad)


@pytest.mark.parametrize("name", sorted(kernels.PROLOGUES))
def test_a_prologue_gives_the_gradients_of_quantizing_its_output(name):
    gen = torch.Generator().manual_seed(3)
    h = (2 * torch.randn(8, 30, generator=gen)).requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    off = torch.tensor(-0.2, requires_grad=True)
    grad = torch.randn(8, 30, generator=gen)
    f = kernels.prologue_function(name)
    ref = functional.affine_fake_quant(f(h), scale, off, 0, 7, scale_grad=0.5, offset_grad=0.25)
    ref.backward(grad)
    args = FakeQuantArgs(scale, off, 0, 7, scale_grad=0.5, offset_grad=0.25)
    for fused in (False, True):
        with qvit.settings(fused=fused):
            out, gh, gs, go = kernels.fake_quant_grads(h.detach(), grad, args, value=True, need_x=True, prologue=name)
            value = kernels.fake_quant_value(h, args, name)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs, scale.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(go, off.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value, ref.detach(), rtol=1e-6, atol=1e-6)
