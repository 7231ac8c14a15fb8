"""Statically compiled kernels for the call signatures a training loop repeats.

A ``torch.compile`` function pays for Dynamo on every call: frame evaluation, guard checks and several layers of
runtime wrappers, a few hundred Python calls in all. In a training step these run between large matrix products
that have evicted them from the CPU caches, and each call then costs more than the work of a small
fake-quantization kernel (measurements in ``docs/performance.md``); a ViT step makes hundreds of such calls. Once the same signature
(kernel, constant arguments, and each tensor's dtype, shape and strides) has been seen ``static_promote_after``
times (:mod:`qvit.runtime`),
:class:`StaticKernelCache` traces the kernel for exactly those inputs (``make_fx``) and compiles the graph with
Inductor (``torch._inductor.compile``), on a short-lived thread of its own (see :func:`_on_own_thread`); later calls
with that signature go straight to the compiled graph. Nothing in such a graph depends on a guard other than the
signature, so the signature is the whole cache key.

CPU tensors only (on CUDA the dispatch cost is hidden behind asynchronous kernels). A signature whose trace or
compilation fails is left to the caller's own path for the rest of the process.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, TypeVar

import torch

from ..runtime import Settings

Signature = Tuple[Hashable, ...]
T = TypeVar("T")
_UNSEEN = object()


def call_signature(kernel: Callable, args: Sequence) -> Optional[Signature]:
    """The cache key of ``kernel(*args)``: the kernel, CPU autocast's state, each tensor's dtype, shape and
    strides, and every other argument as it is; ``None`` when a tensor is not on the CPU or an argument is not
    hashable."""
    parts = [kernel, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")]
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                return None
            parts.append((a.dtype, a.shape, a.stride()))
        else:
            parts.append(a)
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _on_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` run on a new thread, waited for (its exception re-raised here).

    glibc gives a new thread its own malloc arena. Compiling makes many small allocations that outlive it (graphs,
    code, caches); made on the training thread in the middle of a step, they land in the holes that freed
    activations leave in the main heap and split them, so the heap grows (``docs/performance.md``)."""
    box: Dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:     # noqa: BLE001 (handed to the caller)
            box["error"] = err
    worker = threading.Thread(target=run, name="qvit-static-compile")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class _StaticGraph:
    """``kernel`` compiled for one signature: called with the same arguments, tensors in the same places."""

    def __init__(self, kernel: Callable, args: Sequence) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        self.positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        template = list(args)
        forms = []

        def graph(*tensors):
            full = list(template)
            for i, t in zip(self.positions, tensors):
                full[i] = t
            result = kernel(*full)
            forms.append(None if result is None else type(result))
            return () if result is None else result

        tensors = [args[i].detach() for i in self.positions]
        for i in self.positions:
            template[i] = None          # the graph must not keep the example tensors alive
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def compile_graph():
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                traced = make_fx(graph, tracing_mode="fake")(*tensors)      # no real computation
                return torch._inductor.compile(traced, tensors)
        self.compiled = _on_own_thread(compile_graph)
        self.form = forms[-1]       # None, a tensor, or a tuple (the compiled graph returns a list)

    def __call__(self, args: Sequence):
        result = self.compiled(*[args[i] for i in self.positions])
        if self.form is None:
            return None
        return tuple(result) if self.form is tuple else result


class StaticKernelCache:
    """Counts each signature's calls and compiles it statically on its ``static_promote_after``-th call; keeps at most
    ``static_max_signatures`` graphs (the oldest go first)."""

    def __init__(self) -> None:
        self._counts: Dict[Signature, int] = {}
        #: compiled graphs, and ``None`` for signatures whose compilation failed
        self._graphs: Dict[Signature, Optional[_StaticGraph]] = {}

    def __len__(self) -> int:
        """Signatures compiled so far."""
        return sum(g is not None for g in self._graphs.values())

    def clear(self) -> None:
        """Forget every count and compiled graph."""
        self._counts.clear()
        self._graphs.clear()

    def lookup(self, kernel: Callable, args: Sequence, settings: Settings) -> Optional[_StaticGraph]:
        """The compiled graph for ``kernel(*args)``, compiling it when the signature has become hot; ``None`` while
        it has not or where it cannot be compiled. The graph records no autograd history: call it without gradient
        recording or with detached tensors."""
        key = call_signature(kernel, args)
        if key is None:
            return None
        graph = self._graphs.get(key, _UNSEEN)
        if graph is not _UNSEEN:
            return graph
        count = self._counts[key] = self._counts.get(key, 0) + 1
        if count < settings.static_promote_after:
            if len(self._counts) > 16 * settings.static_max_signatures:
                self._counts.clear()      # shapes that never repeat enough (e.g. varying batch sizes)
            return None
        del self._counts[key]
        try:
            graph = _StaticGraph(kernel, args)
        except Exception as err:     # noqa: BLE001 (any tracing or compiler failure: the caller's path computes the same)
            graph = None
            warnings.warn(f"qvit: {getattr(kernel, '__name__', kernel)} could not be compiled statically "
                          f"({type(err).__name__}); it keeps its Dynamo-compiled version", RuntimeWarning)
        while len(self._graphs) >= settings.static_max_signatures:
            del self._graphs[next(iter(self._graphs))]
        self._graphs[key] = graph
        return graph
