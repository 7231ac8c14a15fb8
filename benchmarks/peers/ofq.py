"""OFQ (Liu et al., ICML 2023) run by its authors' own code (nbasyl/OFQ) on qvit's reference model, at the budget of
``benchmarks/results/qat_table_long.md`` (W2A2, 8 epochs at batch 32 over 10,000 training images = 2496 optimizer
steps), with oscillation measured by qvit's per-weight tracker on the integer codes of the authors' weight quantizers.

    mkdir -p /tmp/peers/OFQ && git -C /path/to/OFQ.git archive HEAD | tar -x -C /tmp/peers/OFQ   # outside the project
    python benchmarks/peers/ofq.py --checkout /tmp/peers/OFQ --seeds 0 1     # full runs -> benchmarks/results/qat_peers
    python benchmarks/peers/ofq.py --checkout /tmp/peers/OFQ --seeds 0 --steps 80   # smoke run -> /tmp/ofq_peer_smoke

The authors' modules are imported from the checkout (nothing of theirs lives in this project): their DeiT
(``src/deit_vision_transformer.py:VisionTransformer``) is built with the reference architecture and loaded with qvit's
reference weights, quantized by ``replace_module_by_qmodule_deit`` with the settings of their
``train_scripts/deit_t/w2a2_deit_t.sh`` (StatsQ 2-bit weights, LSQ 2-bit activations with learnable shifts, query-key
reparameterization, 8-bit LSQ patch embedding and head), its lazily created quantizer scales set by one training batch
in eval mode (their ``train.py:setup_alpha``), then trained with AdamW and hard + soft KD from the float model
(``KDLossSoftandHard``) under timm's ``CosineLRScheduler`` as their ``train.py`` configures it, counted in optimizer
steps: 5/340 of the run warm-up from 1e-6, cosine to 1e-5 until 300/340 of the run, 1e-5 after. The last 30/340 of
the run is their CGA stage (``cga.py``): the model is rebuilt with ``qk_reparam_type 1``
(``QAttention_qkreparam_4_cga``), given the trained weights and the AdamW state, and every step freezes the
high-confidence weights of fc1, fc2, proj and v inside the blocks. The final top-1 is taken on a ``qk_reparam_type 0``
model loaded with the trained weights, as their ``eval.py`` does.

The run is recorded under ``ofq_peer/W2A2/seed<s>`` in ``<out>.partial.jsonl`` (finished seeds are skipped when the
command is run again). ``--proj-init pretrained`` copies the float attention projection into the quantized one, which
the authors' ``QAttention_qkreparam`` does not do (it wraps a freshly initialised ``proj``); such runs are recorded under
``ofq_peer_pretrained_proj/W2A2/seed<s>``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import math
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn as nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
from common import CodeTracker, add_checkout, done_runs, evaluate_top1, record, reference_data, train_batches  # noqa: E402

RESULTS = _HERE.parent / "results"
SMOKE_OUT = Path("/tmp/ofq_peer_smoke")
MARKER = "src/quantization/quantizer/statsq.py"

#: the reference model (qvit.create_reference_model) in the arguments of the authors' VisionTransformer
ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4,
            qkv_bias=True, distilled=False, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
SEQ_LEN = (28 // 4) ** 2 + 1
BITS = 2

#: the authors' W2A2 DeiT-T recipe (train_scripts/deit_t/w2a2_deit_t.sh, configs/ours_imagenet_recipe.attn_q.yml)
REF_LR, REF_BATCH = 5.47e-4, 140 * 4
WEIGHT_DECAY, WARMUP_LR, MIN_LR = 0.05, 1e-6, 1e-5
MAIN_EPOCHS, COOLDOWN_EPOCHS, CGA_EPOCHS, WARMUP_EPOCHS = 300, 10, 30, 5
TOTAL_EPOCHS = MAIN_EPOCHS + COOLDOWN_EPOCHS + CGA_EPOCHS
BOUNDARY_RANGE = 0.005

#: the budget of qat_table_long
EPOCHS, BATCH, TRAIN_IMAGES, EVAL_IMAGES = 8, 32, 10000, 2000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=Path, required=True, help="a checkout of nbasyl/OFQ (outside the project)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, help="smoke run: the whole schedule shrunk to N optimizer steps, same shape")
    p.add_argument("--out", type=Path, help=f"output path without suffix (default {RESULTS / 'qat_peers'}; "
                                            f"with --steps {SMOKE_OUT})")
    p.add_argument("--proj-init", choices=("theirs", "pretrained"), default="theirs",
                   help="attention projection after quantization: as the authors' code leaves it (re-initialised) "
                        "or the float model's")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = SMOKE_OUT if args.steps else RESULTS / "qat_peers"
    if args.steps is not None:
        if args.steps < 35:
            p.error("--steps must be at least 35 (the warm-up, 5/340 of the run, needs a step)")
        if args.out.resolve().is_relative_to(RESULTS.resolve()):
            p.error("smoke runs (--steps) are not written into benchmarks/results")
    return args


# ---------------------------------------------------------------------------------------------------- CPU shims
class _CpuTorch(types.ModuleType):
    """``torch`` as the authors' ``lsq.py`` sees it during a run: ``torch.zeros(..., device="cuda")`` (their lazy
    scale creation) allocates on the CPU; everything else is torch itself."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = None
        return torch.zeros(*size, device=device, **kwargs)


@contextlib.contextmanager
def cuda_calls_on_cpu(lsq_module: types.ModuleType) -> Iterator[None]:
    """Hard-coded ``.cuda()`` calls (tensors and modules) are no-ops and ``device="cuda"`` allocations in ``lsq.py``
    land on the CPU, for the duration of the block."""
    saved = torch.Tensor.cuda, nn.Module.cuda, lsq_module.torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    lsq_module.torch = _CpuTorch()
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, lsq_module.torch = saved


# ---------------------------------------------------------------------------------------------------- their code
def load_authors_code(checkout: Path) -> types.SimpleNamespace:
    """The authors' classes and functions, imported from ``checkout``."""
    root = add_checkout(checkout, MARKER)
    stale = sys.modules.get("src")
    if stale is not None and Path(stale.__file__).resolve().parent != (root / "src").resolve():
        raise SystemExit(f"a different package 'src' is already imported ({stale.__file__})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # timm 1.0's deprecation of the old import paths they use; registry overwrite
        import src  # noqa: F401
        from src.deit_vision_transformer import VisionTransformer
        from src.quantization.modules.utils import QMODULE_MAPPINGS_QK_REPARAM, replace_module_by_qmodule_deit
        from src.quantization.modules.attention import QAttention_qkreparam, QAttention_qkreparam_4_cga
        from src.quantization.modules.qlinear import QLinear, LSQ_QConv2d
        from src.quantization.modules.qbias import LearnableBias4img
        from src.quantization.quantizer import lsq as lsq_module
        from src.quantization.utils import KDLossSoftandHard
    if Path(src.__file__).resolve().parent != (root / "src").resolve():
        raise SystemExit(f"'src' resolved to {src.__file__}, not the checkout {root}")
    return types.SimpleNamespace(
        root=root, VisionTransformer=VisionTransformer, replace=replace_module_by_qmodule_deit,
        mappings=QMODULE_MAPPINGS_QK_REPARAM, QAttention=(QAttention_qkreparam, QAttention_qkreparam_4_cga),
        QLinear=QLinear, LSQ_QConv2d=LSQ_QConv2d, LearnableBias4img=LearnableBias4img, lsq=lsq_module,
        KDLossSoftandHard=KDLossSoftandHard,
        freeze_idx=function_from_script(root / "cga.py", "freeze_outside_boundary_weight_idx"))


def function_from_script(path: Path, name: str) -> Callable:
    """One top-level function of a script that runs code at import (``cga.py`` builds its argument parser, sets
    ``torch.backends.cudnn.benchmark`` and imports the timm training stack at module level): only that function's
    definition is compiled from the file and executed, with ``torch`` and ``np`` as its globals."""
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    if len(defs) != 1:
        raise SystemExit(f"{path} has {len(defs)} top-level definitions of {name}")
    namespace: Dict[str, Any] = {"torch": torch, "np": np}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def checkout_digest(root: Path) -> str:
    """SHA-256 over the checkout's Python files used here (src/ and cga.py), to tell checkouts apart."""
    h = hashlib.sha256()
    for f in sorted([*root.joinpath("src").rglob("*.py"), root / "cga.py"]):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def qconfigs() -> Dict[str, Dict[str, Any]]:
    """``train.py:get_qat_model``'s per-module settings for ``--wq-mode statsq --wq-bitw 2 --wq-per-channel --aq-mode
    lsq --aq-bitw 2 --aq-per-channel --aq_clip_learnable --act_layer gelu`` over the YAML's ``qmodules`` (no
    ``head_dist``: the reference model has no distillation token)."""
    weight = dict(mode="statsq", bit=BITS, all_positive=False, symmetric=True, per_channel=True,
                  normalize_first=False, learnable=False)
    act = dict(enable=True, mode="lsq", bit=BITS, per_channel=True, normalize_first=False, learnable=True)
    names = ["patch_embed.proj"] + [f"blocks.{i}.{part}" for i in range(ARCH["depth"]) for part in ("attn", "mlp")]
    return {n: {"weight": weight, "act": act, "q_attn_dropout": 0, "act_layer": nn.GELU} for n in names + ["head"]}


def build_fp(ofq, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Their DeiT with the reference architecture and weights (same parameter names as timm's ViT)."""
    model = ofq.VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, **ARCH)
    model.load_state_dict(state, strict=True)
    return model


def build_quantized(ofq, state: Dict[str, torch.Tensor], qk_type: int, proj_init: str) -> nn.Module:
    """Their quantized DeiT (QKR, ``qk_reparam_type`` 0 or 1) from the reference weights."""
    model = ofq.replace(build_fp(ofq, state), qconfigs(), pretrained_initialized=True, qk_reparam=True,
                        qk_reparam_type=qk_type, boundaryRange=BOUNDARY_RANGE)
    pe = model.patch_embed.proj
    assert isinstance(pe, ofq.LSQ_QConv2d)
    # LSQ_QConv2d's per-pixel input shifts are sized for 224x224 images: the same class at 28x28
    pe.move_b4 = ofq.LearnableBias4img(ARCH["img_size"] ** 2)
    pe.move_aft = ofq.LearnableBias4img(ARCH["img_size"] ** 2)
    if proj_init == "pretrained":
        with torch.no_grad():
            for i, blk in enumerate(model.blocks):
                blk.attn.proj.weight.copy_(state[f"blocks.{i}.attn.proj.weight"])
                blk.attn.proj.bias.copy_(state[f"blocks.{i}.attn.proj.bias"])
    for blk in model.blocks:
        assert isinstance(blk.attn, ofq.QAttention[qk_type]), type(blk.attn)
    return model


@torch.no_grad()
def setup_alpha(model: nn.Module, x: torch.Tensor) -> None:
    """``train.py:setup_alpha``: one training batch in eval mode creates and initialises every lazy LSQ scale (sized
    by that batch's sequence length where the scale is per token)."""
    model.eval()
    model(x)
    model.train()


class Logits(nn.Module):
    """Their DeiT returns ``(logits, attention info)``; evaluation wants the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def make_optimizer(model: nn.Module, lr: float):
    """``create_optimizer_v2(model, **optimizer_kwargs(args))`` with ``--opt adamw --weight-decay 0.05`` (timm: no
    decay on 1-d parameters, biases and the model's ``no_weight_decay`` set) and timm's cosine schedule as
    ``create_scheduler`` builds it, counted in optimizer steps instead of epochs."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=WEIGHT_DECAY)


def make_scheduler(optimizer, plan: Dict[str, int]):
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=plan["cosine_steps"], lr_min=MIN_LR, warmup_t=plan["warmup_steps"],
                             warmup_lr_init=WARMUP_LR, cycle_limit=1, t_in_epochs=False)


def schedule_plan(total: int) -> Dict[str, int]:
    """Their 340 epochs (5 warm-up; cosine over the first 300; 10 cool-down epochs at min_lr; 30 CGA epochs at
    min_lr) mapped onto ``total`` optimizer steps."""
    plan = dict(total_steps=total, warmup_steps=int(round(total * WARMUP_EPOCHS / TOTAL_EPOCHS)),
                cosine_steps=int(round(total * MAIN_EPOCHS / TOTAL_EPOCHS)),
                cga_steps=int(round(total * CGA_EPOCHS / TOTAL_EPOCHS)))
    plan["cga_start"] = total - plan["cga_steps"]
    assert 0 < plan["warmup_steps"] < plan["cosine_steps"] <= plan["cga_start"] < total, plan
    return plan


# ---------------------------------------------------------------------------------------------------- codes
def qk_product(attn: nn.Module) -> torch.Tensor:
    """Each head's W_q^T W_k stacked to (heads * C, C), formed as ``QAttention_qkreparam.forward`` forms it."""
    h = attn.num_heads
    wq = attn.q.weight.reshape(h, attn.q.out_features // h, attn.q.in_features)
    wk = attn.k.weight.reshape(h, attn.k.out_features // h, attn.k.in_features)
    return (wq.transpose(-2, -1).contiguous() @ wk).reshape(h * attn.q.out_features, attn.q.in_features)


def statsq_codes(quantizer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The integer codes k of their StatsQ quantizer: its output is s * (k + 0.5) / n with the per-row scale s it
    stores in ``quantizer.s``, so k = round(output * n / s - 0.5)."""
    out = quantizer(weight)
    n = float(2 ** (quantizer.num_bits - 1))
    s = quantizer.s.reshape(-1, 1).to(out)
    return torch.round(out * n / s - 0.5)


def tracked_sites(model: nn.Module) -> List[Tuple[str, nn.Module, Callable[[], torch.Tensor]]]:
    """Every 2-bit weight quantizer and the value it rounds: fc1, fc2, proj, v and the per-head product W_qk."""
    sites = []
    for i, blk in enumerate(model.blocks):
        a, m = blk.attn, blk.mlp
        sites += [(f"blocks.{i}.mlp.fc1", m.fc1.statsq_fn, lambda m=m: m.fc1.weight),
                  (f"blocks.{i}.mlp.fc2", m.fc2.statsq_fn, lambda m=m: m.fc2.weight),
                  (f"blocks.{i}.attn.proj", a.proj.statsq_fn, lambda a=a: a.proj.weight),
                  (f"blocks.{i}.attn.v", a.v_quant, lambda a=a: a.v.weight),
                  (f"blocks.{i}.attn.qk", a.qk_quant, lambda a=a: qk_product(a))]
    return sites


@torch.no_grad()
def weight_codes(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: statsq_codes(q, value()) for name, q, value in tracked_sites(model)}


@torch.no_grad()
def check_codes(codes: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """The recovered codes equal StatsQ's expression round(clamp(W/s, -1, 1-1e-6) * n - 0.5), s = 2 mean|W| per row."""
    n = 2 ** (BITS - 1)
    for name, _, value in tracked_sites(model):
        w = value()
        s = 2 * w.abs().mean(dim=1, keepdim=True)
        direct = torch.round(torch.clamp(w / s, -1.0, 1.0 - 1e-6) * n - 0.5)
        if not torch.equal(direct, codes[name]) or codes[name].min() < -n or codes[name].max() > n - 1:
            raise RuntimeError(f"the integer codes of {name} do not match StatsQ's expression")


# ---------------------------------------------------------------------------------------------------- CGA
def cga_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """cga.py:966-967 (``--qk_reparam``, DeiT): modules inside ``blocks`` whose names end in fc1, fc2, .v or proj."""
    return [(k, v) for k, v in model.named_modules()
            if "blocks" in k and (k[-3:] == "fc1" or k[-3:] == "fc2" or k[-2:] == ".v" or k[-4:] == "proj")]


def cga_before_step(ofq, modules: List[Tuple[str, nn.Module]]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """cga.py:966-972, after ``loss.backward()``: the high-confidence mask of each weight (their
    ``freeze_outside_boundary_weight_idx``), the gradient of its frozen entries set to zero, their values kept."""
    kept = {}
    for k, v in modules:
        freeze_idx = ofq.freeze_idx(v.weight, BITS, boundaryRange=BOUNDARY_RANGE)
        v.weight.grad = v.weight.grad * freeze_idx * 0.0 + v.weight.grad * (1 - freeze_idx)
        kept[k] = (freeze_idx.detach().clone(), (v.weight * freeze_idx).detach().clone())
    return kept


@torch.no_grad()
def cga_after_step(modules: List[Tuple[str, nn.Module]], kept: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
                   ) -> Tuple[float, float]:
    """cga.py:999-1005, after ``optimizer.step()``: the frozen entries put back. Returns the frozen fraction and the
    largest change of a frozen entry over the step (0 when the restore works)."""
    frozen = total = 0
    drift = 0.0
    for k, v in modules:
        freeze_idx, saved = kept[k]
        v.weight.data.copy_(v.weight.detach().clone() * (1 - freeze_idx) + saved)
        drift = max(drift, float(((v.weight * freeze_idx) - saved).abs().max()))
        frozen += int(freeze_idx.sum())
        total += freeze_idx.numel()
    return frozen / total, drift


def switch_to_cga(ofq, model: nn.Module, optimizer, state: Dict[str, torch.Tensor], proj_init: str,
                  plan: Dict[str, int], lr: float, x: torch.Tensor, step: int):
    """cga.py's start: the model built with ``qk_reparam_type 1`` (``QAttention_qkreparam_4_cga``), setup_alpha, a new
    AdamW, then ``--resume``: the trained weights and the optimizer state loaded; the schedule continues (min_lr)."""
    new = build_quantized(ofq, state, 1, proj_init)
    setup_alpha(new, x)
    names_old = [n for n, _ in model.named_parameters()]
    names_new = [n for n, _ in new.named_parameters()]
    if names_old != names_new:
        raise RuntimeError("the qk_reparam_type 1 model's parameters differ from the type 0 model's")
    new.load_state_dict(model.state_dict(), strict=True)
    new_opt = make_optimizer(new, lr)
    scheduler = make_scheduler(new_opt, plan)
    new_opt.load_state_dict(optimizer.state_dict())
    scheduler.step_update(step)
    with torch.no_grad():
        same = torch.equal(new.eval()(x)[0], model.eval()(x)[0])
    if not same:
        raise RuntimeError("the qk_reparam_type 1 model does not compute what the type 0 model computes")
    old_state = optimizer.state_dict()["state"]
    if any(not torch.equal(old_state[i]["exp_avg"], s["exp_avg"]) for i, s in new_opt.state_dict()["state"].items()):
        raise RuntimeError("the AdamW state did not carry over to the qk_reparam_type 1 model")
    new.train()
    return new, new_opt, scheduler


# ---------------------------------------------------------------------------------------------------- runs
def final_eval(ofq, model: nn.Module, state, proj_init: str, x: torch.Tensor, eval_batches) -> Tuple[float, float]:
    """Top-1 as their eval.py takes it (a ``qk_reparam_type 0`` model, setup_alpha, the trained weights loaded) and
    of the trained model itself."""
    ev = build_quantized(ofq, state, 0, proj_init)
    setup_alpha(ev, x)
    ev.load_state_dict(model.state_dict(), strict=True)
    return evaluate_top1(Logits(ev).eval(), eval_batches), evaluate_top1(Logits(model).eval(), eval_batches)


def run_seed(ofq, seed: int, args, ref: nn.Module, train_set, eval_batches, total: int, spe: int) -> Dict[str, Any]:
    t_setup = time.time()
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    plan = schedule_plan(total)
    lr = REF_LR * BATCH / REF_BATCH
    torch.manual_seed(seed)
    np.random.seed(seed)

    teacher = build_fp(ofq, state).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fp_top1 = evaluate_top1(Logits(teacher), eval_batches)

    batches = train_batches(train_set, BATCH, math.ceil(total / spe), seed, total)
    first = next(batches)
    model = build_quantized(ofq, state, 0, args.proj_init)
    setup_alpha(model, first[2])
    init_top1 = evaluate_top1(Logits(model).eval(), eval_batches)
    model.train()
    optimizer = make_optimizer(model, lr)
    scheduler = make_scheduler(optimizer, plan)
    loss_fn = ofq.KDLossSoftandHard()

    codes = weight_codes(model)
    check_codes(codes, model)
    tracker = CodeTracker({k: c.shape for k, c in codes.items()})
    setup_seconds = time.time() - t_setup
    print(f"[ofq seed {seed}] float top-1 {fp_top1:.2f}%, W{BITS}A{BITS} after initialisation {init_top1:.2f}%; "
          f"{total} steps: warm-up {plan['warmup_steps']}, cosine to step {plan['cosine_steps']}, CGA from step "
          f"{plan['cga_start']} ({plan['cga_steps']} steps), lr {lr:.4g}", file=sys.stderr, flush=True)

    cga, cga_frozen, cga_drift, cga_steps_done = None, [], 0.0, 0
    running = None
    done = 0
    t0 = time.time()
    for _, epoch, x, y in _chain(first, batches):
        if done == plan["cga_start"]:
            model, optimizer, scheduler = switch_to_cga(ofq, model, optimizer, state, args.proj_init, plan, lr, x,
                                                        done)
            cga = cga_modules(model)
        model.train()
        student_logit, _ = model(x)
        with torch.no_grad():
            soft_target, _ = teacher(x)
        loss = loss_fn(student_logit, y, soft_target)
        optimizer.zero_grad()
        loss.backward()
        kept = cga_before_step(ofq, cga) if cga is not None else None
        optimizer.step()
        if kept is not None:
            frozen, drift = cga_after_step(cga, kept)
            cga_frozen.append(frozen)
            cga_drift = max(cga_drift, drift)
            cga_steps_done += 1
        done += 1
        scheduler.step_update(done)
        tracker.step(weight_codes(model))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss {value} at step {done}")
        running = value if running is None else 0.95 * running + 0.05 * value
        if done % args.log_every == 0 or done == total or cga_steps_done == 1 and kept is not None:
            stage = "cga" if cga is not None else "main"
            extra = f", frozen {100 * cga_frozen[-1]:.2f}% of fc1/fc2/proj/v" if cga_frozen else ""
            print(f"[ofq seed {seed}] step {done}/{total} epoch {epoch} {stage} "
                  f"lr {optimizer.param_groups[0]['lr']:.3g} loss {running:.4f} "
                  f"osc {100 * tracker.summary()['osc_fraction']:.3f}%{extra}; "
                  f"{(time.time() - t0) / done:.2f} s/step", file=sys.stderr, flush=True)
        if done == total:
            break
    seconds = time.time() - t0
    if done != total:
        raise RuntimeError(f"the data ran out after {done} of {total} steps")
    top1, top1_trained_module = final_eval(ofq, model, state, args.proj_init, first[2], eval_batches)
    prefix = "ofq_peer" if args.proj_init == "theirs" else "ofq_peer_pretrained_proj"
    rec = dict(key=f"{prefix}/W{BITS}A{BITS}/seed{seed}", method="ofq_peer", code="nbasyl/OFQ",
               checkout=str(ofq.root), checkout_digest=checkout_digest(ofq.root), bits=BITS, seed=seed,
               top1=top1, top1_qk_reparam_type1=top1_trained_module, init_top1=init_top1, fp_top1=fp_top1,
               steps=done, seconds=seconds, seconds_per_step=seconds / done, setup_seconds=setup_seconds,
               lr=lr, batch_size=BATCH, proj_init=args.proj_init, schedule=plan, cga_boundary_range=BOUNDARY_RANGE,
               cga_steps_run=cga_steps_done,
               cga_frozen_fraction=(sum(cga_frozen) / len(cga_frozen)) if cga_frozen else None,
               cga_frozen_max_drift=cga_drift, smoke=args.steps is not None, **tracker.summary())
    return rec


def _chain(first, rest):
    yield first
    yield from rest


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ofq = load_authors_code(args.checkout)
    ref, train_set, eval_batches = reference_data(train_images=TRAIN_IMAGES, eval_images=EVAL_IMAGES)
    ref.eval()
    spe = len(train_set) // BATCH
    total = args.steps or EPOCHS * spe
    args.out.parent.mkdir(parents=True, exist_ok=True)
    finished = done_runs(args.out, args.steps)
    qvit_fp = evaluate_top1(ref, eval_batches)
    with cuda_calls_on_cpu(ofq.lsq):
        for seed in args.seeds:
            prefix = "ofq_peer" if args.proj_init == "theirs" else "ofq_peer_pretrained_proj"
            key = f"{prefix}/W{BITS}A{BITS}/seed{seed}"
            if key in finished:
                print(f"{key}: done already, skipped", file=sys.stderr)
                continue
            rec = run_seed(ofq, seed, args, ref, train_set, eval_batches, total, spe)
            rec["qvit_fp_top1"] = qvit_fp
            if abs(rec["fp_top1"] - qvit_fp) > 1e-9:
                print(f"warning: their DeiT with the reference weights scores {rec['fp_top1']:.2f}%, qvit's model "
                      f"{qvit_fp:.2f}%", file=sys.stderr)
            record(args.out, rec, args.steps)
            print(f"{key}: top-1 {rec['top1']:.2f}% (after initialisation {rec['init_top1']:.2f}%), oscillating "
                  f"{100 * (rec.get('osc_fraction') or 0):.3f}%, {rec['steps']} steps in {rec['seconds']:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
