"""Pooled buffers for the transients of recomputed products: reused across passes, never handed to autograd."""
import threading

import torch
import torch.nn as nn

import qvit
from qvit.kernels.scratch import Scratch, release_scratch, scratch_bytes


def test_buffers_are_reused_after_the_block_and_distinct_within_it():
    release_scratch()
    like = torch.zeros(())
    with Scratch() as s:
        a = s.empty((3, 4), like)
        b = s.empty((2, 6), like)                     # same size, borrowed at the same time: another buffer
        assert a.shape == (3, 4) and b.shape == (2, 6) and a.dtype == like.dtype and a.is_contiguous()
        assert a.data_ptr() != b.data_ptr()
        assert scratch_bytes() == 0                   # both borrowed
    assert scratch_bytes() == 2 * 12 * 4
    with Scratch() as s:
        c = s.empty((12,), like)
        assert c.data_ptr() in (a.data_ptr(), b.data_ptr())
        d = s.empty((12,), torch.zeros((), dtype=torch.float64))     # other dtype: its own buffer
        assert d.dtype == torch.float64 and d.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert scratch_bytes() == 2 * 12 * 4 + 12 * 8
    release_scratch()
    assert scratch_bytes() == 0


def test_pools_are_per_thread_and_only_for_cpu_tensors():
    release_scratch()
    with Scratch() as s:
        s.empty((5,), torch.zeros(()))
        assert s.empty((5,), torch.zeros((), device="meta")).device.type == "meta"
    assert scratch_bytes() == 5 * 4                   # the meta tensor was not pooled
    seen = []
    worker = threading.Thread(target=lambda: seen.append(scratch_bytes()))
    worker.start()
    worker.join()
    assert seen == [0]
    release_scratch()


def test_training_steps_reuse_the_pool_and_return_no_pooled_memory():
    torch.manual_seed(0)
    act = {"kind": "lsq_plus", "bits": 3, "symmetric": False, "granularity": "tensor", "init": "minmax"}
    model = qvit.prepare(nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 6)), {"overrides": {
        "*.input": act, "*.weight": {"kind": "lsq", "bits": 3, "granularity": "channel", "axis": 0}}})
    qvit.calibrate(model, [torch.randn(8, 5, 12)], progress=False)
    model.train()
    release_scratch()

    def step(seed):
        x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out, x.grad, {n: p.grad for n, p in model.named_parameters()}

    out1, gx1, g1 = step(1)
    kept = (out1.clone(), gx1.clone(), {n: g.clone() for n, g in g1.items()})
    held = scratch_bytes()
    assert held > 0                                   # the quantized factors came from the pool
    out2, gx2, g2 = step(2)
    assert scratch_bytes() == held                    # the same buffers again, no growth
    # results of the first step are untouched by the second (none of them is a pooled buffer)
    assert torch.equal(out1, kept[0]) and torch.equal(gx1, kept[1])
    assert all(torch.equal(g1[n], kept[2][n]) for n in g1)
    assert not torch.equal(out1, out2)
    release_scratch()
