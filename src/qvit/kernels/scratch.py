"""Reusable CPU buffers for the tensors a recomputed product forms and drops within one pass.

The quantized factors of a product (``x̂``, ``Ŵ``, ``q̂``, ``k̂``, the quantized softmax output) and the
intermediate gradients of its backward pass live only while that pass runs, and every layer of the same shape
forms them again. Left to the C allocator, each is a fresh multi-megabyte block: glibc keeps freed blocks in its
heap, the small long-lived allocations of the autograd graph land in the holes they leave, and the holes no longer
fit the next block of that size, so the heap keeps growing beyond the bytes actually live (``docs/performance.md``).
Borrowing these tensors from a pool keeps them out of the heap: a few buffers, as many as one pass uses at once,
held between passes and reused by whichever pass comes next.

Pools are per thread (autograd may run backward passes on its own threads) and serve CPU tensors only: the CUDA
caching allocator already reuses blocks by size.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Sequence

import torch

from ..runtime import get_settings

_LOCAL = threading.local()


def _free_lists() -> Dict[torch.dtype, List[torch.Tensor]]:
    pools = getattr(_LOCAL, "pools", None)
    if pools is None:
        pools = _LOCAL.pools = {}
    return pools


class Scratch:
    """Buffers borrowed for one pass, given back when the ``with`` block ends.

    A request takes the most recently returned free buffer that is large enough (its memory is likely still in the
    CPU caches), or a new one. Tensors from :meth:`empty` must not outlive the block (nor be returned to autograd):
    the next pass reuses them.
    """

    def __init__(self) -> None:
        self._taken: List[torch.Tensor] = []

    def empty(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape`` with ``like``'s dtype and device (pooled on the CPU)."""
        shape = tuple(int(n) for n in shape)
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        free = _free_lists().setdefault(like.dtype, [])
        for i in range(len(free) - 1, -1, -1):
            if free[i].numel() >= numel:
                flat = free.pop(i)
                break
        else:
            flat = torch.empty(numel, dtype=like.dtype)
        self._taken.append(flat)
        return flat[:numel].view(shape)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`empty` with ``t``'s shape, dtype and device."""
        return self.empty(t.shape, t)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        pools = _free_lists()
        keep = get_settings().scratch_max_pooled     # per dtype; the least recently returned are dropped
        for flat in self._taken:
            free = pools.setdefault(flat.dtype, [])
            free.append(flat)
            del free[:-keep]
        self._taken.clear()


def scratch_bytes() -> int:
    """Bytes held by this thread's pool (buffers not borrowed at the moment)."""
    return sum(t.numel() * t.element_size() for free in _free_lists().values() for t in free)


def release_scratch() -> None:
    """Drop this thread's pooled buffers (e.g. when training ends); later passes allocate them again."""
    _free_lists().clear()

