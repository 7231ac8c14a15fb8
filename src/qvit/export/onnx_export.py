"""ONNX export of quantized models: QuantizeLinear/DequantizeLinear for uniform grids, the float form for others.

Every enabled quantizer whose grid is a uniform integer grid (:meth:`Quantizer.affine_form`: uniform, LSQ) becomes
``QuantizeLinear -> DequantizeLinear`` (per tensor, or per axis for channel- and group-wise scales, a group's scale
repeated over its channels), with ``Clip`` on the integer codes between them when the bit-width is below 8. Weight
quantizers are folded: the weight is stored as integer codes followed by ``DequantizeLinear``. Every other
quantizer (log2, log-sqrt2, TanQ, SULQ, twin-uniform, StatsQ, power-of-two, LSQ+) is exported in its faithful float
form: the same element-wise arithmetic (round, clip, log, exp ...) that its ``fake_quant`` runs in PyTorch.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..models.prepare import iter_quantizers
from ..quantizers import Quantizer

DEFAULT_OPSET = 17
#: the newest opset torch's TorchScript exporter writes; opset 21 (4-bit tensor types) is reached by relabelling, as
#: 21 changed no semantics of the operators it emits, only added types
TRACE_MAX_OPSET = 20
INT4_OPSET = 21


class _QuantizeDequantize(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; exported as QuantizeLinear (+ Clip) + DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: Optional[int]):
        shape = [1] * x.ndim
        if axis is not None:
            shape[axis] = -1
        s = scale.reshape(shape)
        z = zero_point.to(x.dtype).reshape(shape)
        return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin: int, qmax: int, axis: Optional[int]):
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        dtype = torch.int8 if qmin < 0 else torch.uint8
        full = (-128, 127) if qmin < 0 else (0, 255)
        if (qmin, qmax) != full:
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


def _exp2_symbolic(g, x):
    return g.op("Pow", g.op("Constant", value_t=torch.tensor(2.0)), x)


_EXTRA_SYMBOLICS = {"aten::exp2": _exp2_symbolic}


def _register_symbolics(opset: int) -> None:
    """ONNX forms of the element-wise operators the non-uniform quantizers use that torch's exporter lacks."""
    for name, fn in _EXTRA_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)


def qdq_params(q: Quantizer, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, int, int, Optional[int]]]:
    """``(scale, zero_point, qmin, qmax, axis)`` of ``q`` on ``x`` in ONNX's form, or None when not expressible.

    ``scale`` is ``float32`` (a scalar, or one value per index of ``axis``); ``zero_point`` is ``int8`` or ``uint8``.
    """
    form = q.affine_form()
    if form is None:
        return None
    scale, zero, qmin, qmax = form
    if qmin < -128 or qmax > 255 or (qmin < 0 and qmax > 127):
        return None
    zdtype = torch.int8 if qmin < 0 else torch.uint8
    if q.granularity == "tensor":
        return scale.reshape(()).float(), zero.reshape(()).to(zdtype), qmin, qmax, None
    axis = q.channel_axis(x)
    per_channel = lambda p: q.expand(p, x).reshape(-1)       # noqa: E731 (group scales repeated per channel)
    return per_channel(scale).float(), per_channel(zero).to(zdtype), qmin, qmax, axis


def _export_forward(q: Quantizer):
    def forward(x: torch.Tensor) -> torch.Tensor:
        params = qdq_params(q, x)
        if params is None:
            return q.fake_quant(x)
        return _QuantizeDequantize.apply(x, *params)
    return forward


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every calibrated quantizer of ``model`` computes its export form (see module docstring)."""
    patched = []
    try:
        for site, _, q in iter_quantizers(model):
            if not q.enabled:
                continue
            if not bool(q.calibrated):
                raise ValueError(f"export: quantizer {site} was never calibrated")
            q.forward = _export_forward(q)
            patched.append(q)
        yield model
    finally:
        for q in patched:
            del q.forward


def export_onnx(model: nn.Module, path: os.PathLike, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, unsigned_weights: bool = False) -> Path:
    """Write ``model`` (prepared and calibrated, or plain float) as ONNX at ``path``; returns the path.

    ``example``: an input batch ``[B, C, H, W]`` used to trace the model. Weights of QDQ layers are stored as integer
    codes (see the module docstring), from opset 21 on as INT4/UINT4 where the codes fit in 4 bits. Signed weights
    take onnxruntime's fast u8s8 kernels; on x86 CPUs without VNNI these add pairs of products in int16, which can
    saturate when large activations meet large weights. ``unsigned_weights`` stores them as uint8 with the
    zero-point shifted by 128 (the same values; see :func:`weights_to_uint8`): exact integer arithmetic there, at
    about the speed of float32. The batch dimension is dynamic unless ``dynamic_batch`` is False.
    """
    import onnx
    model = model.eval()
    _register_symbolics(opset)
    buffer = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=min(opset, TRACE_MAX_OPSET),
                          input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    graph = onnx.load_from_string(buffer.getvalue())
    fold_weight_quantization(graph)
    if opset > TRACE_MAX_OPSET:
        for entry in graph.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
        if opset >= INT4_OPSET:
            weights_to_int4(graph)
    if unsigned_weights:
        weights_to_uint8(graph)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return path


def _constants(graph) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def fold_weight_quantization(model) -> int:
    """Replace ``QuantizeLinear`` (and the ``Clip`` after it) of constant tensors by their integer codes, and move
    ``Transpose`` of a constant ``DequantizeLinear`` into its codes; returns how many weights were folded."""
    from onnx import numpy_helper
    graph = model.graph
    consts = _constants(graph)
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop, new_inits, folded = set(), [], 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x, scale, zero = (consts.get(n) for n in node.input[:3])
        if scale is None or zero is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and x.ndim:
            shape[axis % x.ndim] = -1
        info = np.iinfo(zero.dtype)
        codes = np.round(x.astype(np.float32) / scale.astype(np.float32).reshape(shape)) + zero.astype(np.float32).reshape(shape)
        out, producer = node.output[0], node
        users = consumers.get(out, [])
        lo, hi = info.min, info.max
        if len(users) == 1 and users[0].op_type == "Clip" and all(n in consts for n in users[0].input[1:3]):
            lo, hi = int(consts[users[0].input[1]]), int(consts[users[0].input[2]])
            producer = users[0]
            drop.add(users[0].output[0])
        codes = np.clip(codes, lo, hi).astype(zero.dtype)
        name = producer.output[0]
        new_inits.append(numpy_helper.from_array(codes, name))
        drop.add(node.output[0])
        folded += 1
    _remove_nodes(graph, lambda n: n.op_type in ("QuantizeLinear", "Clip") and n.output[0] in drop)
    graph.initializer.extend(new_inits)
    _fold_transposed_dequantize(model)
    _drop_unused(graph)
    return folded


def _constant_dequantize(graph) -> Iterator[Tuple[object, np.ndarray, np.ndarray]]:
    """``(node, codes, zero_point)`` for every DequantizeLinear whose codes are an initializer and whose
    zero-point is constant."""
    from onnx import numpy_helper
    inits = {i.name: i for i in graph.initializer}
    consts = _constants(graph)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(node.input) >= 3:
            zero = consts.get(node.input[2])
            if zero is not None:
                yield node, numpy_helper.to_array(inits[node.input[0]]), zero


def _replace_codes(graph, node, codes, zero, suffix: str) -> None:
    """Point DequantizeLinear ``node`` at new initializers (TensorProtos) for its codes and zero-point."""
    codes.name = node.input[0] + suffix
    zero.name = codes.name + "_zero"
    graph.initializer.extend([codes, zero])
    node.input[0], node.input[2] = codes.name, zero.name


def weights_to_int4(model) -> int:
    """Store the int8/uint8 codes of every constant DequantizeLinear input whose values fit in 4 bits as INT4/UINT4
    (opset >= 21), with a zero-point of the same type; returns how many tensors were converted."""
    from onnx import TensorProto, helper
    converted = 0
    for node, codes, zero in list(_constant_dequantize(model.graph)):
        if codes.dtype not in (np.int8, np.uint8):
            continue
        lo, hi, kind = (-8, 7, TensorProto.INT4) if codes.dtype == np.int8 else (0, 15, TensorProto.UINT4)
        if codes.min() < lo or codes.max() > hi or zero.min() < lo or zero.max() > hi:
            continue
        _replace_codes(model.graph, node, helper.make_tensor("", kind, codes.shape, codes.flatten().tolist()),
                       helper.make_tensor("", kind, zero.shape, zero.flatten().tolist()), "_4bit")
        converted += 1
    _drop_unused(model.graph)
    return converted


def weights_to_uint8(model) -> int:
    """Shift the int8 codes of every constant DequantizeLinear input by +128 into uint8 (zero-point +128), which
    dequantizes to the same values; returns how many tensors were converted.

    onnxruntime's x86 integer kernels multiply uint8 activations with int8 weights through ``vpmaddubsw``, whose
    int16 pair sums saturate on CPUs without VNNI; with uint8 weights it uses a kernel that does not saturate."""
    from onnx import numpy_helper
    converted = 0
    for node, codes, zero in list(_constant_dequantize(model.graph)):
        if codes.dtype != np.int8:
            continue
        shift = lambda a: numpy_helper.from_array((a.astype(np.int16) + 128).astype(np.uint8))   # noqa: E731
        _replace_codes(model.graph, node, shift(codes), shift(zero), "_u8")
        converted += 1
    _drop_unused(model.graph)
    return converted


def _fold_transposed_dequantize(model) -> None:
    """``Transpose(DequantizeLinear(W_int))`` -> ``DequantizeLinear(W_intᵀ)`` (axis permuted), so that MatMul sees
    the DequantizeLinear directly (the pattern onnxruntime fuses into integer kernels)."""
    from onnx import numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    counts: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    drop = set()
    for node in graph.node:
        if node.op_type != "Transpose":
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or counts[dq.output[0]] != 1:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        codes = numpy_helper.to_array(inits[dq.input[0]])
        perm = perm or list(reversed(range(codes.ndim)))
        new_name = dq.input[0] + "_t"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes.transpose(perm)), new_name))
        for attr in dq.attribute:
            if attr.name == "axis":
                attr.i = perm.index(attr.i % codes.ndim)
        dq.input[0] = new_name
        dq.output[0] = node.output[0]
        drop.add(node.output[0])
    _remove_nodes(graph, lambda n: n.op_type == "Transpose" and n.output[0] in drop)


def _remove_nodes(graph, remove) -> None:
    """Remove the nodes for which ``remove(node)`` is true."""
    keep = [n for n in graph.node if not remove(n)]
    del graph.node[:]
    graph.node.extend(keep)


def _drop_unused(graph) -> None:
    """Remove initializers and Constant nodes nothing reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _remove_nodes(graph, lambda n: n.op_type == "Constant" and n.output[0] not in used)


def compare_onnx(model: nn.Module, path: os.PathLike, images: torch.Tensor, *, optimize: bool = False,
                 reduce: str = "max"):
    """Largest absolute difference between ``model``'s logits in PyTorch and the ONNX file's in onnxruntime
    (``reduce="none"``: the ``[images, classes]`` tensor of differences).

    ``optimize=False`` runs onnxruntime with basic graph optimizations only, which keep the ONNX semantics exactly;
    with ``optimize=True`` onnxruntime may fuse QuantizeLinear/DequantizeLinear into integer kernels whose
    arithmetic differs slightly (e.g. int16 saturation of u8s8 products on CPUs without VNNI).
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: images.cpu().numpy()})[0]
    with torch.no_grad():
        ref = model.eval()(images)
    diff = (torch.from_numpy(out) - ref.cpu()).abs()
    return diff if reduce == "none" else float(diff.max())
