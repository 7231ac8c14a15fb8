"""Hot call signatures of the compiled fake-quantization kernels run statically compiled graphs."""
import threading

import pytest
import torch

import qvit
from qvit.kernels import fused as kernels
from qvit.kernels.static_graphs import call_signature
from qvit.quantizers.functional import FakeQuantArgs


@pytest.fixture
def cache():
    """The emptied cache, compiling a signature on its second call, with the fused kernels on."""
    kernels.reset()
    with qvit.settings(fused=True, static_kernels=True, static_promote_after=2):
        yield kernels.STATIC_GRAPHS
    kernels.reset()


def _case():
    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(6, 20, generator=gen)
    scale = (0.3 + torch.rand(6, 1, generator=gen)).requires_grad_()
    return x, scale, torch.randn(6, 20, generator=gen)


def _eager(x, scale, grad):
    """``(x̂, grad_x, grad_scale)`` of LSQ fake quantization onto [-8, 7] (scale gradient factor 0.5), by formula."""
    s = scale.detach()
    v = x / s
    q = torch.clamp(v.round(), -8, 7)
    inside = (v > -8) & (v < 7)
    grad_scale = 0.5 * (grad * torch.where(inside, q - v, q)).sum(1, keepdim=True)
    return q * s, torch.where(inside, grad, 0.0), grad_scale


def test_a_hot_signature_is_compiled_once_and_computes_the_same_values_and_gradients(cache):
    x, scale, grad = _case()
    args = FakeQuantArgs(scale, None, -8, 7, scale_grad=0.5)
    expected = _eager(x, scale, grad)
    results = []
    for _ in range(3):
        out = torch.empty_like(x)
        value = kernels.fake_quant_value(x, args)
        into = kernels.fake_quant_value(x, args, out=out)
        _, gx, gs, _ = kernels.fake_quant_grads(x, grad, args, value=False, need_x=True)
        results.append((value, into, gx, gs))
    # three kernels (value, value into a buffer, gradients), each compiled on its second call
    assert len(cache) == 3
    for value, into, gx, gs in results:
        assert torch.equal(value, expected[0]) and torch.equal(into, expected[0])
        assert torch.equal(gx, expected[1])
        torch.testing.assert_close(gs, expected[2], rtol=1e-5, atol=1e-5)


def test_autograd_through_a_statically_compiled_kernel(cache):
    x, scale, grad = _case()
    expected = _eager(x, scale, grad)
    for step in range(3):
        leaf = x.clone().requires_grad_()
        scale.grad = None
        out = kernels.fake_quant(leaf, FakeQuantArgs(scale, None, -8, 7, scale_grad=0.5))
        out.backward(grad)
        assert torch.equal(out.detach(), expected[0]) and torch.equal(leaf.grad, expected[1])
        # the forward pass keeps round(v) - v in float16
        torch.testing.assert_close(scale.grad, expected[2], rtol=1e-3, atol=1e-3)
    assert len(cache) == 2               # forward and backward kernel


def test_the_signature_tells_shapes_layouts_dtypes_and_constants_apart():
    x = torch.randn(4, 6)
    kernel = kernels._fused_fake_quant
    key = call_signature(kernel, (x, 0.5, None, "gelu"))
    assert key == call_signature(kernel, (torch.randn(4, 6), 0.5, None, "gelu"))
    others = [(torch.randn(4, 7), 0.5, None, "gelu"), (x.t().contiguous().t(), 0.5, None, "gelu"),
              (x.double(), 0.5, None, "gelu"), (x, 0.25, None, "gelu"), (x, 0.5, None, None)]
    assert all(call_signature(kernel, args) != key for args in others)
    assert call_signature(kernels._fused_grads, (x, 0.5, None, "gelu")) != key
    assert call_signature(kernel, (x.to("meta"),)) is None          # CPU tensors only
    assert call_signature(kernel, (x, [1, 2])) is None              # unhashable arguments


def test_signatures_below_the_threshold_stay_on_the_dynamo_kernel(cache):
    x, scale, _ = _case()
    args = FakeQuantArgs(scale, None, -8, 7)
    with qvit.settings(static_promote_after=4):
        for calls in range(1, 5):
            kernels.fake_quant_value(x, args)
            assert len(cache) == (1 if calls == 4 else 0)


def test_without_static_kernels_nothing_is_compiled_statically(cache):
    x, scale, grad = _case()
    with qvit.settings(static_kernels=False):
        values = [kernels.fake_quant_value(x, FakeQuantArgs(scale, None, -8, 7)) for _ in range(4)]
    assert len(cache) == 0 and all(torch.equal(v, _eager(x, scale, grad)[0]) for v in values)


def test_the_cache_keeps_at_most_the_configured_number_of_graphs(cache):
    x, scale, _ = _case()
    with qvit.settings(static_max_signatures=2):
        for n in (5, 6, 7):        # three signatures (shapes), two kept
            for _ in range(2):
                kernels.fake_quant_value(x[:, :n], FakeQuantArgs(scale, None, -8, 7))
        assert len(cache) == 2


def test_a_signature_that_cannot_be_compiled_keeps_the_dynamo_kernel(cache, monkeypatch):
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("inductor failure")
    monkeypatch.setattr(torch._inductor, "compile", broken)
    x, scale, grad = _case()
    args = FakeQuantArgs(scale, None, -8, 7)
    expected = _eager(x, scale, grad)[0]
    assert torch.equal(kernels.fake_quant_value(x, args), expected)
    with pytest.warns(RuntimeWarning, match="could not be compiled statically"):
        assert torch.equal(kernels.fake_quant_value(x, args), expected)
    assert torch.equal(kernels.fake_quant_value(x, args), expected)
    assert attempts == [1] and len(cache) == 0 and qvit.get_settings().fused


def test_compilation_runs_on_its_own_thread_with_the_callers_autocast_state(cache, monkeypatch):
    seen = []
    real_compile = torch._inductor.compile

    def recording(*args, **kwargs):
        seen.append((threading.current_thread() is threading.main_thread(), torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return real_compile(*args, **kwargs)
    monkeypatch.setattr(torch._inductor, "compile", recording)
    x, scale, grad = _case()
    args = FakeQuantArgs(scale, None, -8, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [kernels.fake_quant_value(x, args) for _ in range(2)]
    assert seen == [(False, True, torch.bfloat16)] and len(cache) == 1
    assert all(torch.equal(v, _eager(x, scale, grad)[0]) for v in values)


def test_with_gradients_recorded_the_graph_gets_detached_inputs(cache):
    x, scale, grad = _case()
    bounds = torch.tensor(-8.0), torch.tensor(7.0)
    for _ in range(3):
        value = kernels.run(kernels._fused_fake_quant, x, scale, None, *bounds, None)
        assert value.grad_fn is None and torch.equal(value, _eager(x, scale, grad)[0])
    assert len(cache) == 1
