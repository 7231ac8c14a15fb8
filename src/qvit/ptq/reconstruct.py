"""Block reconstruction: fine-tune each unit's float weights so its quantized output matches the float teacher's.

The default is I&S-ViT's smooth optimization (SOS stages 1 and 3, Zhong et al., arXiv 2311.10126): for every unit in
network order (the patch-embedding conv and the classifier head layer-wise; every ViT ``Block``, Swin
``SwinTransformerBlock`` and ``PatchMerging`` as a block), cache the unit's input and the float teacher's output for
the calibration images, then train the unit's weights and biases with Adam (lr 4e-5, no weight decay, cosine
schedule to 0 over ``iters`` iterations, 64 cached samples drawn at random per iteration) on::

    loss = ((unit_q(x) - y_fp) ** 2).sum(dim=1).mean()      # I&S's lp_loss; on [B, N, C] it sums over tokens

with the straight-through gradient of every quantizer. LayerNorm affine parameters and every quantizer parameter
(scales, zero-points, η ...) are frozen. ``input_source="fp"`` feeds each unit the teacher's input to it (I&S stage
1); ``input_source="quantized"`` feeds the input computed by the current quantized model, i.e. through the units
already reconstructed (I&S stage 3). The target is always the teacher's output.

Options beyond I&S: QDrop (Wei et al. 2022): with ``qdrop_prob = p`` every activation quantizer of the unit being
trained returns, element-wise with probability ``p``, its float input instead of its quantized output.
``rounding="adaround"`` (BRECQ/QDrop style, :mod:`qvit.ptq.adaround`) freezes the weights and learns each one's
rounding direction instead. Learned activation scales are not implemented.

Which quantizers are active during a stage is switched with :func:`quantizers_enabled` (scoped) or the ``set_quantizers``
recipe step (persistent): I&S stage 1 runs with quantized activations and float weights.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block as VitBlock
from tqdm import tqdm

from ..models.prepare import iter_quantizers
from ..models.roles import stem_and_head
from ..quantizers import Quantizer
from .adaround import AdaRoundWeight, adaround, beta_at, commit
from ..calibration import Batches, calibrate, iter_batches
from .steps import PTQContext, register_step

INPUT_SOURCES = ("fp", "quantized")
ROUNDINGS = ("ste", "adaround")
ADAROUND_WARMUP = 0.2   # fraction of the iterations without the rounding regularizer (BRECQ)
UNIT_SETS = ("all", "blocks", "layers")
BLOCK_TYPES: Tuple[type, ...] = (VitBlock, SwinTransformerBlock, PatchMerging)
NORM_TYPES: Tuple[type, ...] = tuple(t for t in (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", None),
) if t is not None)
try:
    from timm.layers import RmsNorm as _TimmRmsNorm
    NORM_TYPES = NORM_TYPES + (_TimmRmsNorm,)
except ImportError:  # older timm
    pass


# ---------------------------------------------------------------------------------------------------- quantizer state
def is_weight_quantizer(quantizer: Quantizer) -> bool:
    """Whether ``quantizer`` quantizes a weight (calibrated from the tensor itself, not from data)."""
    return bool(quantizer.for_weights)


def set_quantizers_enabled(model: nn.Module, weights: Optional[bool] = None, acts: Optional[bool] = None
                    ) -> Dict[Quantizer, bool]:
    """Enable or disable the weight and/or activation quantizers of a prepared model; ``None`` leaves them as they are.

    Returns every quantizer's previous ``enabled`` flag, for :func:`restore_quantizers_enabled`.
    """
    previous = {}
    for _, _, q in iter_quantizers(model):
        previous[q] = q.enabled
        flag = weights if is_weight_quantizer(q) else acts
        if flag is not None:
            q.enabled = bool(flag)
    return previous


def restore_quantizers_enabled(previous: Dict[Quantizer, bool]) -> None:
    """Put back the ``enabled`` flags returned by :func:`set_quantizers_enabled`."""
    for q, flag in previous.items():
        q.enabled = flag


@contextlib.contextmanager
def quantizers_enabled(model: nn.Module, weights: Optional[bool] = None,
                       acts: Optional[bool] = None) -> Iterator[nn.Module]:
    """Context manager: :func:`set_quantizers_enabled` on entry, the previous flags back on exit.

    ``with quantizers_enabled(model, weights=False, acts=True): ...`` runs with float weights and quantized activations
    (I&S-ViT stage 1).
    """
    previous = set_quantizers_enabled(model, weights=weights, acts=acts)
    try:
        yield model
    finally:
        restore_quantizers_enabled(previous)


# ---------------------------------------------------------------------------------------------------- QDrop
@contextlib.contextmanager
def qdrop(module: nn.Module, prob: float, generator: Optional[torch.Generator] = None) -> Iterator[nn.Module]:
    """Context manager: every activation quantizer in ``module`` keeps its float input element-wise with ``prob``.

    Inside the context an enabled, non-observing activation quantizer returns ``where(u < prob, x, q(x))`` with
    ``u ~ U[0, 1)`` drawn per element (from ``generator`` when given; it must live on the activations' device).
    ``prob = 1`` gives exactly the float-activation forward, ``prob = 0`` the quantized one (no hook is installed).
    Weight quantizers are untouched. The gradient reaches ``x`` directly where the float value was kept.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"qdrop prob must be in [0, 1], got {prob}")
    handles = []

    def hook(q: Quantizer, args: Tuple[torch.Tensor, ...], out: torch.Tensor) -> Optional[torch.Tensor]:
        if not q.enabled or q.observing:
            return None
        x = args[0]
        if prob >= 1.0:
            return x
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return torch.where(u < prob, x, out)

    if prob > 0.0:
        for m in module.modules():
            if isinstance(m, Quantizer) and not is_weight_quantizer(m):
                handles.append(m.register_forward_hook(hook))
    try:
        yield module
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One reconstruction unit: a module trained on its own cached input/target pairs."""

    name: str
    module: nn.Module
    kind: str  # "block" or "layer"


def find_units(model: nn.Module, units: Union[str, Sequence[str]] = "all") -> List[Unit]:
    """Reconstruction units of a timm ViT/DeiT/Swin, in module (= execution) order.

    Args:
        model: a prepared (or float) model; names are the module names of ``named_modules``.
        units: ``all`` (stem conv, blocks, head), ``blocks`` (every ViT ``Block``, Swin ``SwinTransformerBlock``
            and ``PatchMerging``), ``layers`` (the stem conv and the classifier layer(s) only), or a list of module
            names / globs (``["blocks.0", "head"]``) naming any modules.

    A unit nested inside another selected unit is dropped (the outer one already trains it).
    """
    named = list(model.named_modules())
    if isinstance(units, str):
        if units not in UNIT_SETS:
            raise ValueError(f"units must be one of {UNIT_SETS} or a list of module names, got {units!r}")
        stem, heads = stem_and_head(model)
        layer_names = {n for n in (stem, *heads) if n}
        picked = []
        for name, module in named:
            if units in ("all", "blocks") and isinstance(module, BLOCK_TYPES):
                picked.append(Unit(name, module, "block"))
            elif units in ("all", "layers") and name in layer_names and isinstance(module, (nn.Conv2d, nn.Linear)):
                picked.append(Unit(name, module, "layer"))
    else:
        patterns = list(units)
        picked = []
        for name, module in named:
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                kind = "layer" if isinstance(module, (nn.Conv2d, nn.Linear)) else "block"
                picked.append(Unit(name, module, kind))
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(u.name, p) for u in picked)]
        if unmatched:
            raise ValueError(f"units {unmatched} match no module of the model")
    outer: List[Unit] = []
    for unit in picked:
        if not any(unit.name.startswith(o.name + ".") for o in outer):
            outer.append(unit)
    return outer


def trainable_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The parameters reconstruction trains: all of ``module``'s except normalization affines and quantizer state."""
    frozen = set()
    for m in module.modules():
        if isinstance(m, Quantizer) or isinstance(m, NORM_TYPES):
            frozen.update(id(p) for p in m.parameters())
    return [(n, p) for n, p in module.named_parameters() if id(p) not in frozen]


# ---------------------------------------------------------------------------------------------------- caching
class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of the network."""


def _check_kwargs(name: str, kwargs: Dict[str, Any]) -> None:
    extra = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if extra:
        raise TypeError(f"unit {name} is called with extra arguments {sorted(extra)}; "
                                  "reconstruction replays units on their first positional input only")


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def capture_unit_io(model: nn.Module, name: str, data: Batches, *, inputs: bool = True, outputs: bool = False,
                    batch_size: int = 32) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The input to and/or output of module ``name`` of ``model`` for every image of ``data``, on the CPU.

    ``data`` is a tensor ``[N, C, H, W]`` or an iterable of ``x`` / ``(x, y)`` batches. Each batch runs only as far
    as the unit (forward hooks; the rest of the network is skipped). Returns ``(inputs [N, ...], outputs [N, ...])``
    with ``None`` for what was not asked. The model runs in eval mode with its current quantizer states.
    """
    if not (inputs or outputs):
        raise ValueError("capture_unit_io needs inputs=True or outputs=True")
    module = model.get_submodule(name)
    device = _model_device(model)
    ins: List[torch.Tensor] = []
    outs: List[torch.Tensor] = []

    def pre_hook(m: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        _check_kwargs(name, kwargs)
        if not args or not torch.is_tensor(args[0]):
            raise TypeError(f"unit {name} must be called with its input tensor as first positional argument")
        if inputs:
            ins.append(args[0].detach().to("cpu", copy=True))
        if not outputs:
            raise _StopForward

    def post_hook(m: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if not torch.is_tensor(out):
            raise TypeError(f"unit {name} returns {type(out).__name__}, not a tensor")
        outs.append(out.detach().to("cpu", copy=True))
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if outputs:
        handles.append(module.register_forward_hook(post_hook))
    was_training = model.training
    model.eval()
    try:
        for x in iter_batches(data, batch_size):
            seen = len(ins) + len(outs)
            try:
                model(x.to(device))
            except _StopForward:
                pass
            if len(ins) + len(outs) == seen:
                raise RuntimeError(f"module {name} did not run in the model's forward pass")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not ins and not outs:
        raise ValueError("capture_unit_io got no data")
    return (torch.cat(ins) if inputs else None), (torch.cat(outs) if outputs else None)


def unit_data(model: nn.Module, fp_model: nn.Module, name: str, data: Batches, *, input_source: str = "fp",
              batch_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` on the CPU for unit ``name``: its input from ``fp_model`` (``fp``) or from ``model``
    (``quantized``, with ``model``'s current weights and quantizer states), and ``fp_model``'s output."""
    if input_source not in INPUT_SOURCES:
        raise ValueError(f"input_source must be one of {INPUT_SOURCES}, got {input_source!r}")
    if input_source == "fp":
        x, y = capture_unit_io(fp_model, name, data, inputs=True, outputs=True, batch_size=batch_size)
    else:
        x, _ = capture_unit_io(model, name, data, inputs=True, outputs=False, batch_size=batch_size)
        _, y = capture_unit_io(fp_model, name, data, inputs=False, outputs=True, batch_size=batch_size)
    return x, y


# ---------------------------------------------------------------------------------------------------- training
def lp_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """I&S-ViT's reconstruction loss ``((pred - target)^2).sum(dim=1).mean()`` (0-d).

    For ``[B, N, C]`` token tensors it sums over the tokens and averages over batch and channels; for logits
    ``[B, classes]`` it sums over the classes; for ``[B, C, H, W]`` conv outputs over the channels.
    """
    return (pred - target).pow(2).sum(dim=1).mean()


@torch.no_grad()
def unit_loss(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    """:func:`lp_loss` of ``module`` on all cached pairs (sample-weighted mean over batches of ``batch_size``)."""
    device = _model_device(module)
    total, n = 0.0, inputs.shape[0]
    for i in range(0, n, batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        total += lp_loss(module(x), y).item() * x.shape[0]
    return total / n


def reconstruct_unit(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, iters: int = 1000,
                     lr: float = 4e-5, batch_size: int = 64, qdrop_prob: float = 0.0, rounding: str = "ste",
                     round_weight: float = 0.01, generator: Optional[torch.Generator] = None,
                     qdrop_generator: Optional[torch.Generator] = None,
                     progress: Optional[tqdm] = None) -> Dict[str, Any]:
    """Train ``module``'s :func:`trainable_parameters` so that ``module(inputs) ≈ targets``; return a log record.

    Args:
        module: the unit (quantized modules inside use their quantizers' straight-through gradients).
        inputs: cached unit inputs ``[N, ...]`` (any device; batches are moved to the module's device).
        targets: the teacher's outputs ``[N, ...]``.
        iters: optimizer steps (Adam, weight decay 0; ``ste``: cosine schedule from ``lr`` to 0 over ``iters``,
            ``adaround``: constant ``lr``).
        lr: initial learning rate.
        batch_size: samples drawn at random (without replacement) from the cache at every step.
        qdrop_prob: QDrop probability during training (see :func:`qdrop`); 0 is plain STE fine-tuning.
        rounding: ``ste`` (train weights and biases through the straight-through quantizers, I&S-ViT) or
            ``adaround`` (freeze them and learn each weight's rounding direction, :mod:`qvit.ptq.adaround`; the
            hard-rounded weights are written back at the end; BRECQ/QDrop use lr 1e-3 and 20k iterations).
        round_weight: AdaRound's regularizer weight λ (off during the first 20 % of the iterations).
        generator: CPU generator for the batch draws; ``qdrop_generator``: one on the module's device.
        progress: a tqdm bar advanced once per step.

    The module runs in eval mode (no dropout / drop-path). Parameters it does not train are frozen while it trains
    and every ``requires_grad`` flag is restored afterwards. Record keys: ``params`` (trained elements),
    ``first_loss`` / ``last_loss`` (batch losses of the first and last step).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(f"need as many inputs as targets (got {inputs.shape[0]} and {targets.shape[0]})")
    with contextlib.ExitStack() as stack:
        states = stack.enter_context(adaround(module)) if rounding == "adaround" else None
        params = [st.V for st in states] if states is not None else [p for _, p in trainable_parameters(module)]
        record = _train_unit(module, inputs, targets, params, iters=iters, lr=lr, batch_size=batch_size,
                             qdrop_prob=qdrop_prob, states=states, round_weight=round_weight, generator=generator,
                             qdrop_generator=qdrop_generator, progress=progress)
        if states:
            commit(states)
            record["rounded_up"] = sum(int((st.V >= 0).sum()) for st in states)
    return record


def _train_unit(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, params: List[nn.Parameter], *,
                iters: int, lr: float, batch_size: int, qdrop_prob: float, states: Optional[List[AdaRoundWeight]],
                round_weight: float, generator: Optional[torch.Generator],
                qdrop_generator: Optional[torch.Generator], progress: Optional[tqdm]) -> Dict[str, Any]:
    record: Dict[str, Any] = {"params": sum(p.numel() for p in params), "first_loss": None, "last_loss": None}
    if not params:
        if progress is not None:
            progress.update(iters)
        return record
    train_ids = {id(p) for p in params}
    flags = {p: p.requires_grad for p in module.parameters()}
    was_training = module.training
    device = _model_device(module)
    n = inputs.shape[0]
    batch_size = min(batch_size, n)
    for p in module.parameters():
        p.requires_grad_(id(p) in train_ids)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    # I&S-ViT anneals the weights' lr to 0; BRECQ/QDrop keep AdaRound's lr constant
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0) if not states else None
    every = max(1, iters // 20)
    module.eval()
    try:
        with torch.enable_grad(), qdrop(module, qdrop_prob, qdrop_generator):
            for it in range(iters):
                idx = torch.randperm(n, generator=generator)[:batch_size]
                x = inputs[idx].to(device, non_blocking=True)
                y = targets[idx].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = lp_loss(module(x), y)
                total = loss
                if states and it >= int(ADAROUND_WARMUP * iters):
                    beta = beta_at(it, iters, ADAROUND_WARMUP)
                    total = loss + round_weight * sum(st.regularizer(beta) for st in states)
                total.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if it == 0 or it == iters - 1 or (progress is not None and it % every == 0):
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"reconstruction loss became {value} at step {it}")
                    if it == 0:
                        record["first_loss"] = value
                    record["last_loss"] = value
                    if progress is not None:
                        progress.set_postfix_str(f"loss={value:.4g}", refresh=False)
                if progress is not None:
                    progress.update(1)
    finally:
        for p in params:
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        module.train(was_training)
    return record


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    ptrs = {p.data_ptr() for p in a.parameters() if p.numel()}
    return any(p.data_ptr() in ptrs for p in b.parameters() if p.numel())


def reconstruct(model: nn.Module, fp_model: nn.Module, data: Batches, *, input_source: str = "fp",
                iters: int = 1000, lr: float = 4e-5, batch_size: int = 64, units: Union[str, Sequence[str]] = "all",
                seed: int = 0, qdrop_prob: float = 0.0, rounding: str = "ste", round_weight: float = 0.01,
                capture_batch_size: int = 32, progress: bool = True) -> List[Dict[str, Any]]:
    """Reconstruct the units of a calibrated, prepared ``model`` one after another against the float ``fp_model``.

    Args:
        model: the prepared model; its enabled quantizers must be calibrated. Trained in place.
        fp_model: the float teacher with the same module names (not modified; must not share parameters).
        data: calibration images ``[N, C, H, W]`` (or an iterable of batches), the same for inputs and targets.
        input_source: ``fp`` (teacher's unit input, I&S stage 1) or ``quantized`` (``model``'s unit input through
            the already-reconstructed units, computed once per unit before training it, I&S stage 3).
        iters, lr, batch_size: per unit, see :func:`reconstruct_unit`.
        units: which units (see :func:`find_units`).
        seed: seeds the batch draws and the QDrop masks.
        qdrop_prob: QDrop probability (0: I&S's plain STE fine-tuning).
        rounding, round_weight: ``ste`` (I&S) or ``adaround`` (learned rounding), see :func:`reconstruct_unit`.
        capture_batch_size: batch size of the forward passes that fill the cache.
        progress: show a tqdm bar over all units' steps.

    Only one unit's inputs and targets are held (on the CPU) at a time. Returns one record per unit: ``unit``,
    ``kind``, ``samples``, ``params``, ``first_loss``, ``last_loss``, ``capture_seconds`` (filling the cache) and
    ``seconds`` (capture and training).
    """
    if input_source not in INPUT_SOURCES:
        raise ValueError(f"input_source must be one of {INPUT_SOURCES}, got {input_source!r}")
    if fp_model is None:
        raise ValueError("reconstruction needs the float teacher model (fp_model)")
    if fp_model is model or _shares_parameters(model, fp_model):
        raise ValueError("fp_model shares parameters with model: pass an unmodified float copy as the teacher")
    pending = [site for site, _, q in iter_quantizers(model) if q.enabled and not bool(q.calibrated)]
    if pending:
        raise RuntimeError(f"calibrate before reconstructing; uncalibrated quantizers: {pending[:4]}")
    selected = find_units(model, units)
    device = _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    qdrop_generator = torch.Generator(device=device).manual_seed(seed) if qdrop_prob > 0 else None
    was_training, fp_training = model.training, fp_model.training
    model.eval()
    fp_model.eval()
    records: List[Dict[str, Any]] = []
    bar = tqdm(total=len(selected) * iters, desc="reconstruct", disable=not progress, file=sys.stderr, leave=False)
    try:
        for unit in selected:
            t0 = time.time()
            bar.set_description(f"reconstruct {unit.name}", refresh=False)
            bar.set_postfix_str("", refresh=False)
            x, y = unit_data(model, fp_model, unit.name, data, input_source=input_source,
                             batch_size=capture_batch_size)
            capture_seconds = time.time() - t0
            record = reconstruct_unit(unit.module, x, y, iters=iters, lr=lr, batch_size=batch_size,
                                      qdrop_prob=qdrop_prob, rounding=rounding, round_weight=round_weight,
                                      generator=generator, qdrop_generator=qdrop_generator, progress=bar)
            records.append({"unit": unit.name, "kind": unit.kind, "samples": int(x.shape[0]), **record,
                            "capture_seconds": capture_seconds, "seconds": time.time() - t0})
            del x, y
    finally:
        bar.close()
        model.train(was_training)
        fp_model.train(fp_training)
    return records


# ---------------------------------------------------------------------------------------------------- recipe steps
@register_step("reconstruct")
def reconstruct_step(ctx: PTQContext, input_source: str = "fp", iters: Union[int, Mapping[Any, int]] = 1000,
                     lr: float = 4e-5,
                     batch_size: int = 64, units: Union[str, Sequence[str]] = "all", seed: int = 0,
                     qdrop_prob: float = 0.0, rounding: str = "ste", round_weight: float = 0.01) -> None:
    """Recipe step: :func:`reconstruct` ``ctx.model`` against ``ctx.fp_model`` on ``ctx.calib_data``.

    ``iters`` may depend on the activation bit-width (``{6: 200, default: 1000}``, see :meth:`PTQContext.by_bits`).
    Appends ``{"step": "reconstruct", <options>, "units": [per-unit records with first/last loss]}`` to ``ctx.log``.
    """
    iters = ctx.by_bits(iters)
    if ctx.fp_model is None:
        raise ValueError("the reconstruct step needs the float teacher (PTQContext.fp_model)")
    records = reconstruct(ctx.model, ctx.fp_model, ctx.calib_data, input_source=input_source, iters=iters, lr=lr,
                          batch_size=batch_size, units=units, seed=seed, qdrop_prob=qdrop_prob,
                          rounding=rounding, round_weight=round_weight, capture_batch_size=ctx.batch_size,
                          progress=ctx.progress)
    ctx.log.append({"step": "reconstruct", "input_source": input_source, "iters": iters, "lr": lr,
                    "batch_size": batch_size, "qdrop_prob": qdrop_prob, "rounding": rounding, "seed": seed,
                    "units": records})


@register_step("set_quantizers")
def set_quantizers_step(ctx: PTQContext, weights: Optional[bool] = None, acts: Optional[bool] = None,
                     recalibrate_weights: bool = False) -> None:
    """Recipe step: enable/disable weight and activation quantizers from here on (``None``: unchanged).

    With ``recalibrate_weights`` every weight quantizer is reset and calibrated again on the current weights (I&S-ViT
    initialises the weight quantizers on the stage-1 weights before stage 3).
    """
    set_quantizers_enabled(ctx.model, weights=weights, acts=acts)
    if recalibrate_weights:
        for _, _, q in iter_quantizers(ctx.model):
            if is_weight_quantizer(q):
                q.reset()
        calibrate(ctx.model, (), weights_only=True, progress=False)
    ctx.log.append({"step": "set_quantizers", "weights": weights, "acts": acts,
                    "recalibrate_weights": recalibrate_weights})
