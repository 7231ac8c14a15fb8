"""Nagel et al.'s own code (Qualcomm-AI-research/oscillations-qat) on qvit's reference model, at the budget of qvit's
QAT table, with oscillation measured by qvit's tracker on the integer codes of their weight quantizers.

    python benchmarks/peers/nagel.py --checkout PATH --methods lsq dampen freeze --seeds 0 1
    python benchmarks/peers/nagel.py --checkout PATH --methods freeze --seeds 0 --steps 60 --out /tmp/nagel_smoke
    python benchmarks/peers/nagel.py --checkout PATH --init    # their initialisation beside qvit's, no training
    python benchmarks/peers/nagel.py --checkout PATH --clamp-grad inclusive   # their clamp gradient under torch <= 2.12

PATH is a checkout of that repository. Its enumerations need Python <= 3.10 (3.11 rejects their Flag values), so
run this with a 3.10 environment that has qvit installed (``python3.10 -m venv ENV && ENV/bin/pip install -e .
scipy``). Their code provides everything of the method: the hijacked ``QuantLinear``/``QuantConv`` layers and
``QuantizedActivation`` quantizers (symmetric uniform, learnable step, MSE range estimation on one training batch),
``set_range_estimators``, ``separate_quantized_model_params``, ``optimizer_lr_factory`` (SGD with a per-epoch cosine
to 0; Adam at 1e-5 for the step sizes), ``DampeningLoss`` with ``UpdateDampeningLossWeighting``, and
``add_oscillation_trackers`` with ``UpdateFreezingThreshold`` (both on ``CosineTempDecay`` schedules from 25 % of the
iterations), with the settings of their MobileNetV2 scripts and qvit's ``nagel_*`` recipes at 2 bits (lr 0.0033 at
batch 128, here 0.000825 at batch 32; weight decay 2.5e-5, 5e-5 when freezing; freezing threshold 0.1 -> 0.01).

The glue: their code has wrappers for CNNs only, so this file puts their layers into the ViT the way their
``LSQ_paper`` setup quantizes a network and qvit's recipes quantize a ViT: every linear layer's input and weight
(the patch embedding's weight at 8 bits and its image input unquantized, the head's weight and input at 8 bits), and
attention's q, k, v and softmax output, with their ``QuantizedActivation``. Their trainer (pytorch-ignite) is
replaced by the same loop without ignite: forward, loss, backward, both optimizers' steps, the per-epoch scheduler
step, and the schedule updates at every iteration start. The model is evaluated once at the end (their loop also
evaluates after every epoch, which advances their tracker's EMA by a few calls; qvit's tracker never counts them).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR_AT_128, BATCH_AT_LR = 0.0033, 128
SETTINGS = {"lsq": dict(weight_decay=2.5e-5), "dampen": dict(weight_decay=2.5e-5, dampen=(0.0, 0.1)),
            "freeze": dict(weight_decay=5e-5, freeze=(0.1, 0.01))}
ANNEAL_START = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=Path, required=True, help="a checkout of Qualcomm-AI-research/oscillations-qat")
    p.add_argument("--methods", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--steps", type=int, help="a shorter schedule of this many steps (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clamp-grad", choices=("installed", "inclusive"), default="installed",
                   help="the gradient of torch.clamp in their quantizers at a bound: as the installed torch computes it "
                        "(no gradient where the rounded code equals int_min or int_max) or, as in the torch 1.9 their "
                        "requirements pin, passed at the bounds; 'inclusive' runs are recorded as "
                        "nagel_peer_inclusive_<method>")
    p.add_argument("--weight-decay", type=float,
                   help="the weights' SGD weight decay instead of the method's (2.5e-5; 5e-5 when freezing); such runs "
                        "are recorded as <key>_wd<value>")
    p.add_argument("--init", action="store_true", help="only compare the initialisations (top-1 before training, "
                                                       "step sizes) and write benchmarks/results/qat_peers_init")
    p.add_argument("--out", type=Path, help="records, without suffix (default: benchmarks/results/qat_peers; "
                                            "with --steps: /tmp/qat_peers_smoke)")
    return p.parse_args(argv)


def import_peer(checkout: Path) -> SimpleNamespace:
    common.add_checkout(checkout, "utils/oscillation_tracking_utils.py")
    import importlib
    for name in ("activations", "activations_me"):     # timm 1.0 moved these from timm.models.layers
        sys.modules.setdefault(f"timm.models.layers.{name}", importlib.import_module(f"timm.layers.{name}"))
    from quantization.autoquant_utils import quantize_model
    from quantization.base_quantized_classes import FP32Acts, QuantizedActivation
    from quantization.base_quantized_model import QuantizedModel
    from quantization.hijacker import QuantizationHijacker
    from quantization.quantizers import QMethods
    from quantization.range_estimators import OptMethod, RangeEstimators
    from quantization.utils import (pass_data_for_range_estimation, separate_quantized_model_params,
                                    set_range_estimators)
    from utils import CosineTempDecay, DotDict
    from utils.optimizer_utils import optimizer_lr_factory
    from utils.oscillation_tracking_utils import add_oscillation_trackers
    from utils.qat_utils import (CompositeLoss, DampeningLoss, MethodPropagator, UpdateDampeningLossWeighting,
                                 UpdateFreezingThreshold)
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "checkout"})


class _InclusiveClamp(torch.autograd.Function):
    """``torch.clamp`` whose gradient passes where ``lo <= x <= hi`` (bounds included)."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where((x >= ctx.lo) & (x <= ctx.hi), grad, 0.0), None, None


class _TorchWithInclusiveClamp:
    """The ``torch`` module as their quantizer file sees it, with :class:`_InclusiveClamp` as ``clamp``."""

    @staticmethod
    def clamp(x, lo=None, hi=None, *, min=None, max=None):       # noqa: A002 (torch's keyword names)
        lo, hi = (min if lo is None else lo), (max if hi is None else hi)
        if lo is None or hi is None:                 # a one-sided clamp (their step size's lower bound): torch's own
            return torch.clamp(x, min=lo, max=hi)
        return _InclusiveClamp.apply(x, lo, hi)

    def __getattr__(self, name):
        return getattr(torch, name)


def use_inclusive_clamp() -> None:
    """Their uniform quantizers clamp the rounded code, ``clamp(round_ste(x / delta), int_min, int_max)``. The installed
    torch passes no gradient where the code sits on a bound, so at 2 bits only the codes -1 and 0 get a weight gradient;
    the torch 1.9 of their requirements passed it there. This puts that gradient back without touching their code."""
    import quantization.quantizers.uniform_quantizers as uq
    uq.torch = _TorchWithInclusiveClamp()


def build_model(peer: SimpleNamespace, fp: nn.Module, bits: int) -> nn.Module:
    """The reference ViT with their quantized layers and activation quantizers at the sites qvit quantizes."""
    qparams = dict(method=peer.QMethods.symmetric_uniform.cls, act_method=peer.QMethods.symmetric_uniform.cls,
                   n_bits=bits, n_bits_act=bits, per_channel_weights=False,
                   weight_range_method=peer.RangeEstimators.MSE.cls,
                   weight_range_options=dict(opt_method=peer.OptMethod.grid),
                   act_range_method=peer.RangeEstimators.MSE.cls,
                   act_range_options=dict(opt_method=peer.OptMethod.grid), quantize_input=True)

    class PeerAttention(nn.Module):
        """timm's attention with their activation quantizers on q, k, v and the softmax output."""

        def __init__(self, attn: nn.Module) -> None:
            super().__init__()
            self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
            self.qkv, self.proj = (peer.quantize_model(m, **qparams) for m in (attn.qkv, attn.proj))
            self.q_act, self.k_act, self.v_act, self.probs_act = (peer.QuantizedActivation(**qparams)
                                                                  for _ in range(4))

        def forward(self, x: torch.Tensor, attn_mask=None, **kwargs) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = (act(t.contiguous()) for act, t in ((self.q_act, q), (self.k_act, k), (self.v_act, v)))
            probs = self.probs_act(((q @ k.transpose(-2, -1)) * self.scale).softmax(-1))
            return self.proj((probs @ v).transpose(1, 2).reshape(b, n, c))

    class PeerViT(peer.QuantizedModel):
        def __init__(self, vit: nn.Module) -> None:
            super().__init__(input_size=(1, 1, 28, 28))
            for block in vit.blocks:
                block.attn = PeerAttention(block.attn)
                block.mlp.fc1, block.mlp.fc2 = (peer.quantize_model(m, **qparams)
                                                for m in (block.mlp.fc1, block.mlp.fc2))
            vit.patch_embed.proj = peer.quantize_model(vit.patch_embed.proj, **qparams)
            vit.head = peer.quantize_model(vit.head, **qparams)
            # LSQ_paper: the first layer's weights at 8 bits and its input (the image) in float; the last layer's
            # weights and input at 8 bits
            vit.patch_embed.proj.activation_quantizer = peer.FP32Acts()
            vit.patch_embed.proj.weight_quantizer.quantizer.n_bits = 8
            vit.head.weight_quantizer.quantizer.n_bits = 8
            vit.head.activation_quantizer.quantizer.n_bits = 8
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(x)

    return PeerViT(copy.deepcopy(fp))


def initialised_model(peer: SimpleNamespace, fp: nn.Module, train_set, bits: int, seed: int) -> nn.Module:
    """Their quantized ViT with ranges estimated as their ``main.py`` does: MSE on one training batch of 128 images
    (seeded by the run seed), passed with weights and activations quantized, then the step sizes made learnable."""
    torch.manual_seed(seed)
    model = build_model(peer, fp, bits)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=gen)[:BATCH_AT_LR].tolist()
    est = torch.stack([train_set[i][0] for i in idx])
    peer.pass_data_for_range_estimation(loader=[(est, None)], model=model, act_quant=True, weight_quant=True,
                                        max_num_batches=1)
    config = peer.DotDict(qat=peer.DotDict(grad_scaling=False), quant=peer.DotDict(weight_quant=True, act_quant=True))
    peer.set_range_estimators(config, model)
    return model


def peer_step_size(modules: Dict[str, nn.Module], site: str) -> Optional[float]:
    """The step size of their quantizer at qvit's ``site`` (``blocks.0.attn.qkv.weight``, ``blocks.0.attn.probs``
    ...) among their model's ``named_modules()``, or None where they leave the site in float."""
    prefix, slot = site.rsplit(".", 1)
    if slot in ("q", "k", "v", "probs"):
        manager = modules[f"vit.{prefix}.{slot}_act"].activation_quantizer
    else:
        layer = modules[f"vit.{prefix}"]
        manager = layer.weight_quantizer if slot == "weight" else layer.activation_quantizer
    quantizer = getattr(manager, "quantizer", None)
    return None if quantizer is None else float(quantizer.delta)


def float_calibration(recipe):
    """``recipe`` with qvit's calibration on the float network and its default MSE grid (the ``nagel_*`` recipes
    before they followed the reference's sequential estimation)."""
    variant = copy.deepcopy(recipe)
    variant.calibration = {**variant.calibration, "sequential": False}
    for part in ("weight", "activation"):
        for key in ("min_ratio", "margin", "absmax"):
            variant.config[part].pop(key, None)
    return variant


def init_report(peer: SimpleNamespace, args: argparse.Namespace, data) -> Dict[str, Any]:
    """Top-1 before training of their initialised model and of qvit's ``nagel_lsq`` (its initialisation, then
    qvit's calibration on the float network), with the largest step-size difference from theirs over every site."""
    import qvit
    from qvit.qat import initialise_qat
    fp, train_set, eval_batches = data
    theirs = initialised_model(peer, fp, train_set, args.bits, seed=0)
    their_modules = dict(theirs.named_modules())
    rows = [dict(side="authors", label="Nagel et al.'s code (sequential MSE on one batch of 128)",
                 top1=common.evaluate_top1(theirs, eval_batches))]
    recipe = qvit.load_recipe("nagel_lsq")
    for label, rec in ((f"qvit `nagel_lsq` v{recipe.version}", recipe),
                       ("qvit, calibration on the float network (earlier `nagel_*` versions)", float_calibration(recipe))):
        ours = initialise_qat(fp, rec, train_set, rec.quant_config(args.bits, args.bits), progress=False)
        diffs = {}
        for site, _, q in qvit.iter_quantizers(ours):
            step = peer_step_size(their_modules, site)
            if step is not None and q.enabled:
                diffs[site] = abs(float(q.scale.reshape(-1)[0]) - step) / step
        worst = max(diffs, key=diffs.get)
        first = next((site for site, d in diffs.items() if d >= 1e-4), None)      # in module (forward) order
        rows.append(dict(side="qvit", label=label, top1=common.evaluate_top1(ours, eval_batches),
                         sites=len(diffs), same_sites=sum(d < 1e-4 for d in diffs.values()),
                         median_step_rel_diff=statistics.median(diffs.values()),
                         max_step_rel_diff=diffs[worst], worst_site=worst, first_different_site=first))
    return dict(bits=args.bits, rows=rows)


def weight_layers(peer: SimpleNamespace, model: nn.Module, max_bits: int = 4) -> Dict[str, nn.Module]:
    """Their hijacked layers whose weights have at most ``max_bits`` bits (their tracker's rule)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, peer.QuantizationHijacker) and m.weight_quantizer.quantizer.n_bits <= max_bits}


@torch.no_grad()
def integer_codes(layers: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """Each layer's weight codes as the forward uses them (frozen codes where frozen), without advancing their
    tracker (``skip_tracking``)."""
    return {name: m.weight_quantizer.quantizer.to_integer_forward(m.weight, skip_tracking=True)
            for name, m in layers.items()}


def run(peer: SimpleNamespace, method: str, seed: int, args: argparse.Namespace, data) -> Dict[str, Any]:
    fp, train_set, eval_batches = data
    settings = dict(SETTINGS[method])
    if args.weight_decay is not None:
        settings["weight_decay"] = args.weight_decay
    model = initialised_model(peer, fp, train_set, args.bits, seed)
    quant_params, model_params, _ = peer.separate_quantized_model_params(model)
    epochs = common.EPOCHS
    steps_per_epoch = len(train_set) // common.BATCH
    total = args.steps or epochs * steps_per_epoch
    lr = LR_AT_128 * common.BATCH / BATCH_AT_LR
    model_opt, model_sched = peer.optimizer_lr_factory(peer.DotDict(
        optimizer="SGD", learning_rate=lr, momentum=0.9, weight_decay=settings["weight_decay"],
        learning_rate_schedule="cosine:0"), model_params, epochs)
    quant_opt, _ = peer.optimizer_lr_factory(peer.DotDict(
        optimizer="Adam", learning_rate=1e-5, momentum=0.9, weight_decay=0.0, learning_rate_schedule=None),
        quant_params, epochs)
    optimizer = peer.MethodPropagator([model_opt, quant_opt])
    task_loss = nn.CrossEntropyLoss()
    loss_fn, handlers = task_loss, []
    if "dampen" in settings:
        dampening = peer.DampeningLoss(model, settings["dampen"][0], "kernel_mean")
        loss_fn = peer.CompositeLoss({"task_loss": task_loss, "dampening_loss": dampening})
        handlers.append(peer.UpdateDampeningLossWeighting(dampening, peer.CosineTempDecay(
            t_max=total, temp_range=settings["dampen"], rel_decay_start=ANNEAL_START)))
    if "freeze" in settings:
        trackers = peer.add_oscillation_trackers(model, max_bits=4, momentum=0.001,
                                                 freeze_threshold=settings["freeze"][0], use_ema_x_int=True)
        handlers.append(peer.UpdateFreezingThreshold(trackers, peer.CosineTempDecay(
            t_max=total, temp_range=settings["freeze"], rel_decay_start=ANNEAL_START)))
    layers = weight_layers(peer, model)
    tracker = common.CodeTracker({n: m.weight.shape for n, m in layers.items()})
    engine = SimpleNamespace(state=SimpleNamespace(iteration=0))
    progress = common.Progress(f"nagel {method} seed {seed}", total)
    last_epoch = 0
    for step, epoch, x, y in common.train_batches(train_set, common.BATCH, epochs, seed, total):
        if epoch != last_epoch:
            model_sched.step()                       # their engine steps the scheduler when an epoch completes
            last_epoch = epoch
        engine.state.iteration = step
        for handler in handlers:
            handler(engine)
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        tracker.step(integer_codes(layers))
        progress(step, float(loss))
    top1 = common.evaluate_top1(model, eval_batches)
    rec = dict(key=run_key(method, seed, args), method=method, bits=args.bits, clamp_grad=args.clamp_grad,
               weight_decay=settings["weight_decay"], seed=seed, top1=top1, steps=total, seconds=progress.seconds,
               **tracker.summary())
    if "freeze" in settings:
        frozen = sum(int(t.frozen.sum()) for n, t in trackers.items() if t.frozen is not None)
        rec["frozen_fraction"] = frozen / rec["tracked_weights"]
    return rec


def write_init_report(report: Dict[str, Any], args: argparse.Namespace) -> None:
    from qvit.report import write_benchmark_record
    command = "python benchmarks/peers/nagel.py --checkout PATH --init" + (f" --bits {args.bits}" if args.bits != 2 else "")
    lines = ["| initialisation | top-1 before training (%) | sites compared | step size equal to theirs (within "
             "0.01 %) | first site that differs | median step-size difference | largest |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["side"] == "qvit":
            cells = [str(r["sites"]), str(r["same_sites"]), f"`{r['first_different_site']}`",
                     f"{100 * r['median_step_rel_diff']:.2g} %",
                     f"{100 * r['max_step_rel_diff']:.2g} % (`{r['worst_site']}`)"]
        else:
            cells = [""] * 5
        lines.append(f"| {r['label']} | {r['top1']:.2f} | " + " | ".join(cells) + " |")
    md = (f"# Nagel et al.'s initialisation beside qvit's: the reference model at W{args.bits}A{args.bits}\n\n"
          f"Command: `{command}`\n\nTop-1 on the 2,000 evaluation images of the QAT table after the quantizers are "
          "initialised and before any training step; the step-size difference is |s_qvit - s_authors| / s_authors at "
          "each quantized site both sides have (weights, layer inputs, q, k, v and attention probabilities).\n\n" + "\n".join(lines) + "\n")
    write_benchmark_record(common.RESULTS / "qat_peers_init", dict(command=command, **report), md)
    print(md)


def run_key(method: str, seed: int, args: argparse.Namespace) -> str:
    tag = "_inclusive" if args.clamp_grad == "inclusive" else ""
    wd = f"_wd{args.weight_decay:g}" if args.weight_decay is not None else ""
    return f"nagel_peer{tag}_{method}{wd}/W{args.bits}A{args.bits}/seed{seed}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (Path("/tmp/qat_peers_smoke") if args.steps else common.RESULTS / "qat_peers")
    peer = import_peer(args.checkout)
    if args.clamp_grad == "inclusive":
        use_inclusive_clamp()
    data = common.reference_data()
    if args.init:
        write_init_report(init_report(peer, args, data), args)
        return 0
    done = common.done_runs(out, args.steps)
    for method in args.methods:
        for seed in args.seeds:
            key = run_key(method, seed, args)
            if key in done:
                continue
            rec = run(peer, method, seed, args, data)
            common.record(out, rec, args.steps)
            print(f"{key}: top-1 {rec['top1']:.2f}%, oscillating {100 * rec['osc_fraction']:.3f}%, "
                  f">= 4 reversals {100 * rec['repeat_reversal_fraction']:.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
