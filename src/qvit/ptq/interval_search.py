"""PTQ4ViT's interval search (Yuan et al., ECCV 2022, arXiv 2111.12293).

Every matrix product of the network is one *search op* with two quantized operands: a linear or convolution layer
(``input``, ``weight``), the attention logits ``q·kᵀ`` (``q``, ``k``) and the attention output ``p·v``
(``probs``, ``v``). Op by op, in network order, the step sizes of the two operands are searched alternately
(``rounds`` times; weights before inputs, as in the reference code) on a fixed grid, each candidate scored by the
error it causes in the op's output ``O`` over the calibration images:

* ``metric="hessian"`` (the paper's Hessian-guided metric): ``Σ (g ⊙ (Ô - O))²`` with ``g = ∂L/∂O`` the gradient of
  the task loss at the float model. The calibration images carry no labels, so ``L`` is the cross-entropy of the
  float model's output against its own top-1 class. (The released code uses ``KL(softmax(pred) ‖
  softmax(raw_pred))`` with every other layer in float, whose gradient is analytically zero: its search is decided
  by floating-point noise, which qvit does not reproduce.)
* ``metric="mse"``: ``Σ (Ô - O)²``.

Search spaces, per quantizer family (:func:`register_search_space`):

* ``uniform`` (symmetric): ``Δ ∈ {(α + i(β-α)/n)·Δ0 : i = 0..n}``, ``Δ0 = max|x| / (qmax + 1/2)`` per column
  (``2^(k-1) - 1/2`` for the signed grid), PTQ4ViT's α = 0.01, β = 1.2, n = 100;
* ``twin_uniform``: its own grid (the power-of-two split ``2^-m`` of the post-softmax twin, the post-GELU ``Δ2``).

Granularity: an operand's columns must map to independent slices of the output, so that each column's best
candidate can be chosen on its own: per-tensor anything; per-channel or per-group weights along the output axis
(PTQ4ViT's three q/k/v blocks of the qkv weight: ``num_groups: 3``); per-head attention operands (axis 1). Inputs of
linear and convolution layers are searched per tensor only. Operands come from the float network (the reference
code's default, ``sequential=False``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..nn._attention_sites import QuantAttentionCore
from ..nn.quant_conv import QuantConv2d
from ..nn.quant_linear import QuantLinear
from ..quantizers import Quantizer
from ..quantizers.base import MIN_SCALE, set_tensor
from ..quantizers.twin_uniform import TwinUniformQuantizer
from ..quantizers.uniform import UniformQuantizer
from ..calibration import Batches, iter_batches
from ..registry import Registry
from .reconstruct import quantizers_enabled
from .steps import PTQContext, register_step

METRICS = ("hessian", "mse")
Params = Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------- search spaces
@dataclass
class SearchSettings:
    """PTQ4ViT's grid: ``num_candidates + 1`` ratios from ``alpha`` to ``beta`` of the max-based step."""

    alpha: float = 0.01
    beta: float = 1.2
    num_candidates: int = 100


SearchSpace = Callable[[Quantizer, torch.Tensor, SearchSettings], Tuple[Params, List[Params]]]
SEARCH_SPACES: Registry[type, SearchSpace] = Registry("interval-search space for")


def register_search_space(cls: type) -> Callable[[SearchSpace], SearchSpace]:
    """Decorator: ``fn(quantizer, columns [samples, columns], settings) -> (initial params, candidate params)``.

    Params map the quantizer's buffer names to per-column tensors ``[columns]``.
    """

    return SEARCH_SPACES.register(cls)


def search_space(quantizer: Quantizer, cols: torch.Tensor, settings: SearchSettings) -> Tuple[Params, List[Params]]:
    space = SEARCH_SPACES.find(type(quantizer))
    if space is None:
        raise ValueError(f"interval search has no search space for {type(quantizer).__name__} ({quantizer.site}); "
                         f"supported: {', '.join(SEARCH_SPACES.names())}")
    return space(quantizer, cols, settings)


@register_search_space(UniformQuantizer)
def _uniform_space(q: UniformQuantizer, cols: torch.Tensor, s: SearchSettings) -> Tuple[Params, List[Params]]:
    if not q.symmetric:
        raise ValueError(f"{q.site or type(q).__name__}: PTQ4ViT's interval search needs symmetric uniform "
                         "quantizers")
    qmax = q.code_range()[1]
    d0 = (cols.abs().amax(0) / (qmax + 0.5)).clamp(min=MIN_SCALE)
    zero = torch.zeros_like(d0)
    ratios = [s.alpha + i * (s.beta - s.alpha) / s.num_candidates for i in range(s.num_candidates + 1)]
    return ({"scale": d0, "zero_point": zero},
            [{"scale": (d0 * r).clamp(min=MIN_SCALE), "zero_point": zero} for r in ratios])


@register_search_space(TwinUniformQuantizer)
def _twin_space(q: TwinUniformQuantizer, cols: torch.Tensor, s: SearchSettings) -> Tuple[Params, List[Params]]:
    if bool(q.calibrated):
        current = {name: getattr(q, name).detach().clone()
                   for name in ("delta1", "delta2", "offset1", "offset2", "split")}
        current = {k: v.expand(cols.shape[1]).clone() if v.numel() == 1 else v for k, v in current.items()}
    else:
        current = q.fit_columns(cols)
    return current, [{k: v.to(cols.device) for k, v in p.items()} for p in q.candidate_params(cols)]


def apply_params(quantizer: Quantizer, params: Params) -> None:
    """Write per-column ``params`` into the quantizer's buffers and mark it calibrated."""
    for name, value in params.items():
        set_tensor(quantizer, name, value.detach().float().reshape(-1))
    quantizer.calibrated.fill_(True)


# ---------------------------------------------------------------------------------------------------- search ops
@dataclass
class Operand:
    slot: str                   # quantizer slot on the module
    tap: Optional[str]          # attention tap name (None: the layer input or its weight)
    axis: Optional[int]         # operand axis its columns may lie on (None: per tensor only)
    out_axis: Optional[int]     # output axis those columns map to


@dataclass
class SearchOp:
    """One matrix product: ``output = compute(a, b)`` with quantized operands ``a`` and ``b``."""

    name: str
    kind: str                   # linear | conv | qk | pv
    module: nn.Module
    operands: Tuple[Operand, Operand]

    def quantizer(self, operand: Operand) -> Optional[Quantizer]:
        q = getattr(self.module, f"{operand.slot}_quantizer", None)
        return q if q is not None and q.enabled else None

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.kind == "linear":
            return F.linear(a, b, m.bias)
        if self.kind == "conv":
            return m._conv_forward(a, b, m.bias)
        if self.kind == "qk":
            logits = a @ b.transpose(-2, -1)
            return logits * m.scale if m.scale_after_matmul else logits
        return a @ b


def find_search_ops(model: nn.Module) -> List[SearchOp]:
    """Every linear, convolution and attention product of a prepared model with at least one enabled quantizer,
    in module order (an attention module's ``q·kᵀ`` and ``p·v`` come before its ``qkv`` and ``proj`` layers)."""
    ops: List[SearchOp] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            candidates = [SearchOp(name, "linear", m, (Operand("weight", None, 0, -1), Operand("input", None, None, None)))]
        elif isinstance(m, QuantConv2d):
            candidates = [SearchOp(name, "conv", m, (Operand("weight", None, 0, 1), Operand("input", None, None, None)))]
        elif isinstance(m, QuantAttentionCore):
            candidates = [SearchOp(f"{name}:qk", "qk", m, (Operand("q", "q", 1, 1), Operand("k", "k", 1, 1))),
                          SearchOp(f"{name}:pv", "pv", m, (Operand("probs", "probs", 1, 1), Operand("v", "v", 1, 1)))]
        else:
            continue
        ops.extend(op for op in candidates if any(op.quantizer(o) is not None for o in op.operands))
    return ops


# ---------------------------------------------------------------------------------------------------- capture
def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def capture(model: nn.Module, ops: Sequence[SearchOp], data: Batches, *, gradients: bool,
            batch_size: int = 32) -> Dict[str, Dict[str, torch.Tensor]]:
    """Float operands (and, with ``gradients``, ``∂L/∂O`` of each op's output) of ``ops`` for every image.

    Runs ``model`` with every quantizer disabled. ``L`` is the summed cross-entropy of the output against its own
    top-1 class. Returns ``{op.name: {"a": ..., "b": ..., "grad": ...}}`` on the model's device (weights are not
    copied: ``b`` is absent for linear and convolution ops).
    """
    store: Dict[str, Dict[str, List[torch.Tensor]]] = {op.name: {"a": [], "b": [], "grad": []} for op in ops}
    by_module: Dict[int, List[SearchOp]] = {}
    for op in ops:
        by_module.setdefault(id(op.module), []).append(op)
    handles = []

    def keep_grad(name: str, out: torch.Tensor) -> None:
        if gradients and out.requires_grad:
            out.register_hook(lambda g: store[name]["grad"].append(g.detach()))

    def layer_pre(module: nn.Module, args: Tuple[Any, ...]) -> None:
        for op in by_module[id(module)]:
            store[op.name]["a"].append(args[0].detach())

    def layer_post(module: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> None:
        for op in by_module[id(module)]:
            keep_grad(op.name, out)

    def attention_tap(module: nn.Module, tap: str, x: torch.Tensor) -> None:
        for op in by_module.get(id(module), ()):
            a, b = op.operands
            if tap == a.tap:
                store[op.name]["a"].append(x.detach())
            elif tap == b.tap:
                store[op.name]["b"].append(x.detach())
            elif (tap, op.kind) in (("logits", "qk"), ("context", "pv")):
                keep_grad(op.name, x)

    tapped = []
    for op in ops:
        if op.kind in ("linear", "conv"):
            if not any(h[0] is op.module for h in handles):
                handles.append((op.module, op.module.register_forward_pre_hook(layer_pre)))
                handles.append((op.module, op.module.register_forward_hook(layer_post)))
        elif op.module.tap is None or op.module.tap is attention_tap:
            op.module.tap = attention_tap
            tapped.append(op.module)
        else:
            raise RuntimeError(f"{op.name}: the attention module already has a tap installed")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with quantizers_enabled(model, weights=False, acts=False):
            for x in iter_batches(data, batch_size):
                x = x.to(device)
                if gradients:
                    with torch.enable_grad():
                        x = x.detach().requires_grad_(True)
                        out = model(x)
                        loss = F.cross_entropy(out, out.detach().argmax(-1), reduction="sum")
                        torch.autograd.grad(loss, [x])
                else:
                    with torch.no_grad():
                        model(x)
    finally:
        for _, h in handles:
            h.remove()
        for m in tapped:
            m.tap = None
        model.train(was_training)
    result: Dict[str, Dict[str, torch.Tensor]] = {}
    for op in ops:
        entry = {k: torch.cat(v) for k, v in store[op.name].items() if v}
        if "a" not in entry:
            raise RuntimeError(f"{op.name} did not run in the model's forward pass")
        if gradients and "grad" not in entry:
            raise RuntimeError(f"{op.name}: no gradient reached its output (is it on the path to the logits?)")
        result[op.name] = entry
    return result


# ---------------------------------------------------------------------------------------------------- search
def _column_scores(err: torch.Tensor, quantizer: Quantizer, operand: Operand, x: torch.Tensor) -> torch.Tensor:
    """Sum ``err`` (output-shaped) into one score per column of ``quantizer`` (``[columns]``)."""
    columns = quantizer.num_columns(x)
    if columns == 1:
        return err.sum().reshape(1)
    out_axis = operand.out_axis if operand.out_axis is not None and operand.out_axis >= 0 else err.ndim - 1
    per_channel = err.movedim(out_axis, -1).reshape(-1, err.shape[out_axis]).sum(0)
    return per_channel.reshape(columns, -1).sum(1)


def _check_granularity(op: SearchOp, operand: Operand, quantizer: Quantizer, x: torch.Tensor) -> None:
    if quantizer.num_columns(x) == 1:
        return
    if operand.axis is None or quantizer.channel_axis(x) != operand.axis % x.ndim:
        where = "per tensor only" if operand.axis is None else f"per tensor or along axis {operand.axis}"
        raise ValueError(f"{op.name}: the {operand.slot} quantizer is {quantizer.granularity} along axis "
                         f"{quantizer.axis}; the interval search handles this operand {where}")


def _score(out: torch.Tensor, ref: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
    diff = out - ref
    return (diff * grad).pow(2) if grad is not None else diff.pow(2)


@torch.no_grad()
def search_op(op: SearchOp, data: Dict[str, torch.Tensor], settings: SearchSettings, rounds: int = 3,
              metric: str = "hessian") -> Dict[str, Any]:
    """Search both operands' step sizes of ``op`` on its captured float ``data``; returns ``{op, kind,
    initial_error, final_error}`` (the metric summed over the output, before and after)."""
    # operand tensors in operand order: layers list (weight, input), attention products (first, second)
    if op.kind in ("linear", "conv"):
        tensors = {0: op.module.weight.detach(), 1: data["a"]}
    else:
        tensors = {0: data["a"], 1: data["b"]}
    grad = data.get("grad") if metric == "hessian" else None
    ref = op.compute(*_ordered(op, tensors[0], tensors[1]))
    quantizers = {i: op.quantizer(o) for i, o in enumerate(op.operands)}
    candidates: Dict[int, List[Params]] = {}
    for i, q in quantizers.items():
        if q is None:
            continue
        x = tensors[i]
        _check_granularity(op, op.operands[i], q, x)
        initial, candidates[i] = search_space(q, q.to_columns(x).float(), settings)
        apply_params(q, initial)

    def output(fixed: Dict[int, torch.Tensor]) -> torch.Tensor:
        return op.compute(*_ordered(op, fixed[0], fixed[1]))

    def quantized(i: int) -> torch.Tensor:
        q = quantizers[i]
        return tensors[i] if q is None else q.fake_quant(tensors[i])

    initial_error = _score(output({0: quantized(0), 1: quantized(1)}), ref, grad).sum().item()
    for _ in range(rounds):
        for i in (0, 1):
            q = quantizers[i]
            if q is None:
                continue
            other = quantized(1 - i)
            scores = []
            for params in candidates[i]:
                apply_params(q, params)
                fixed = {i: q.fake_quant(tensors[i]), 1 - i: other}
                scores.append(_column_scores(_score(output(fixed), ref, grad), q, op.operands[i], tensors[i]))
            best = torch.stack(scores).argmin(0)                              # [columns]
            chosen = {k: torch.stack([p[k].reshape(-1).expand(best.numel()) for p in candidates[i]])
                      .gather(0, best.unsqueeze(0))[0] for k in candidates[i][0]}
            apply_params(q, chosen)
    final_error = _score(output({0: quantized(0), 1: quantized(1)}), ref, grad).sum().item()
    for q in quantizers.values():
        if q is not None:
            q.check_params()
    return {"op": op.name, "kind": op.kind, "initial_error": initial_error, "final_error": final_error}


def _ordered(op: SearchOp, first: torch.Tensor, second: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``compute`` arguments from operand-order tensors (layers list the weight first, compute takes it second)."""
    return (second, first) if op.kind in ("linear", "conv") else (first, second)


def interval_search(model: nn.Module, data: Batches, *, metric: str = "hessian", alpha: float = 0.01,
                    beta: float = 1.2, num_candidates: int = 100, rounds: int = 3, ops_per_pass: int = 8,
                    batch_size: int = 32, progress: bool = True) -> List[Dict[str, Any]]:
    """Run PTQ4ViT's interval search on every op of a prepared ``model`` (in place); see the module docstring.

    ``data``: calibration images ``[N, C, H, W]`` (or an iterable of batches). ``ops_per_pass``: how many ops'
    operands one capture pass keeps (memory against passes). Returns one record per op.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0 <= alpha < beta:
        raise ValueError(f"need 0 <= alpha < beta, got alpha={alpha}, beta={beta}")
    for name, value in (("num_candidates", num_candidates), ("rounds", rounds), ("ops_per_pass", ops_per_pass)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    settings = SearchSettings(alpha, beta, num_candidates)
    ops = find_search_ops(model)
    records: List[Dict[str, Any]] = []
    bar = tqdm(total=len(ops), desc="interval search", disable=not progress, file=sys.stderr, leave=False)
    try:
        for start in range(0, len(ops), ops_per_pass):
            chunk = ops[start:start + ops_per_pass]
            captured = capture(model, chunk, data, gradients=(metric == "hessian"), batch_size=batch_size)
            for op in chunk:
                bar.set_postfix_str(op.name, refresh=False)
                records.append(search_op(op, captured.pop(op.name), settings, rounds, metric))
                bar.update(1)
    finally:
        bar.close()
    return records


@register_step("interval_search")
def interval_search_step(ctx: PTQContext, metric: str = "hessian", alpha: float = 0.01, beta: float = 1.2,
                         num_candidates: int = 100, rounds: int = 3, ops_per_pass: int = 8) -> None:
    """Recipe step: :func:`interval_search` on ``ctx.calib_data``; per-op errors go to ``ctx.log``."""
    records = interval_search(ctx.model, ctx.calib_data, metric=metric, alpha=alpha, beta=beta,
                              num_candidates=num_candidates, rounds=rounds, ops_per_pass=ops_per_pass,
                              batch_size=ctx.batch_size, progress=ctx.progress)
    ctx.log.append({"step": "interval_search", "metric": metric, "alpha": alpha, "beta": beta,
                    "num_candidates": num_candidates, "rounds": rounds, "ops": records})
