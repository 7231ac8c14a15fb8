"""The ``qvit`` command line: ``demo``, ``eval``, ``ptq``, ``qat``, ``export``, ``softlabels``, ``report``,
``recipes``, ``describe``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

from .data import (DatasetMissingError, build_dataset, calibration_batch, create_eval_transform, create_loader,
                   resolve_split_dir, subset)
from .evaluate import evaluate
from .models import REFERENCE_MODEL, build_model, describe, format_sites, prepare
from .models.factory import WeightsUnavailableError
from .quantizers import NotCalibratedError
from .ptq import quantize_ptq
from .recipes import list_recipes, load_recipe

DEMO_BITS = (8, 4, 3)
#: the packed checkpoint of the trained model in a `qvit qat` run directory
PACKED_NAME = "model.safetensors"
#: `qvit demo` evaluates on a seeded 3000 of the 10k test images, so that every PTQ recipe at three bit-widths fits
#: in 10 minutes on 2 cores (evaluation is most of the time).
DEMO_EVAL_IMAGES = 3000


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=REFERENCE_MODEL,
                   help=f"timm model name (default: {REFERENCE_MODEL}, the shipped Fashion-MNIST ViT)")
    g.add_argument("--checkpoint", type=Path, help="local weights file for --model (offline)")
    g.add_argument("--pretrained", action="store_true", help="use timm's published weights (needs network)")
    g.add_argument("--num-classes", type=int,
                   help="classifier size (default: the class count of --data's folder; 10 for Fashion-MNIST)")
    g.add_argument("--data", type=Path,
                   help="ImageNet-style folder (train/ and val/ of class sub-folders); default: Fashion-MNIST")
    g.add_argument("--eval-images", type=int, help="evaluate on a seeded random subset of this many images "
                                                  f"(default: all; demo: {DEMO_EVAL_IMAGES})")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int, help="seed of the calibration / evaluation subsets "
                                          "(default: the recipe's calibration seed, else 0)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_quant_args(p: argparse.ArgumentParser, multi: bool = False, kind: str = "ptq") -> None:
    g = p.add_argument_group("quantization")
    if multi:
        g.add_argument("--recipes", nargs="+", help="PTQ recipes to run (default: all)")
        g.add_argument("--bits", nargs="+", type=int, default=list(DEMO_BITS),
                       help="bit-widths; each runs as WbAb (default: 8 4 3)")
    else:
        default = "minmax" if kind == "ptq" else "lsq"
        g.add_argument("--recipe", default=default, help=f"{kind.upper()} recipe name or YAML path (default: "
                                                         f"{default}; see `qvit recipes`)")
        g.add_argument("--w-bits", type=int, default=8)
        g.add_argument("--a-bits", type=int, default=8)
    shorter = ("fewer calibration images and reconstruction/search iterations" if kind == "ptq"
               else "a fraction of an epoch instead of the published hundreds")
    g.add_argument("--budget", choices=("full", "quick"), default="quick" if multi else "full",
                   help=f"the recipes' published budget, or their shorter 'quick' one ({shorter}) "
                        f"(default: {'quick' if multi else 'full'})")
    g.add_argument("--calib-images", type=int, help="calibration images (default: the recipe's)")
    g.add_argument("--config", type=Path, help="YAML QuantConfig patch applied on top of the recipe")


class _Session:
    """The model, data sets and options one command works with."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.progress = not args.no_progress
        num_classes = args.num_classes
        if num_classes is None and args.data is not None and args.model != REFERENCE_MODEL:
            from torchvision.datasets.folder import find_classes
            num_classes = len(find_classes(str(resolve_split_dir(args.data, "val")))[0])
        elif num_classes is None and args.model != REFERENCE_MODEL and not args.checkpoint:
            num_classes = 10
        torch.manual_seed(0 if args.seed is None else args.seed)   # models without weights get a reproducible init
        self.model = build_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                 num_classes=num_classes)
        self.transform = create_eval_transform(self.model)

    @property
    def seed(self) -> int:
        return 0 if self.args.seed is None else self.args.seed

    def eval_set(self, materialize: bool = False):
        ds = subset(build_dataset(self.args.data, "val", self.transform), self.args.eval_images, self.seed)
        if materialize:
            loader = create_loader(ds, batch_size=256, workers=self.args.workers)
            xs, ys = zip(*loader)
            ds = TensorDataset(torch.cat(xs), torch.cat(ys))
        return ds

    def calib_images(self, num: int, recipe_seed: int = 0) -> torch.Tensor:
        """``num`` training images (eval transform); seed: ``--seed``, else the recipe's."""
        seed = recipe_seed if self.args.seed is None else self.args.seed
        return calibration_batch(build_dataset(self.args.data, "train", self.transform), num, seed)[0]

    def loader(self, ds):
        return create_loader(ds, batch_size=self.args.batch_size, workers=self.args.workers)


def _overrides(args: argparse.Namespace) -> Optional[dict]:
    if getattr(args, "config", None) is None:
        return None
    import yaml
    with open(args.config) as f:
        return yaml.safe_load(f) or {}


def cmd_eval(args: argparse.Namespace) -> int:
    s = _Session(args)
    res = evaluate(s.model, s.loader(s.eval_set()), progress=s.progress, desc=f"eval {args.model}")
    print(f"{args.model} FP32: {res}")
    return 0


def _load_recipe(name: str, budget: str):
    recipe = load_recipe(name)
    return recipe.quick_variant() if budget == "quick" else recipe


def cmd_ptq(args: argparse.Namespace) -> int:
    s = _Session(args)
    recipe = _load_recipe(args.recipe, args.budget)
    num = args.calib_images or recipe.calibration.get("num_images", 32)
    calib = s.calib_images(num, recipe.calibration.get("seed", 0))
    loader = s.loader(s.eval_set())
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    t0 = time.time()
    qmodel = quantize_ptq(s.model, recipe, calib, w_bits=args.w_bits, a_bits=args.a_bits,
                          overrides=_overrides(args), progress=s.progress)
    seconds = time.time() - t0
    q = evaluate(qmodel, loader, progress=s.progress, desc=f"eval W{args.w_bits}A{args.a_bits}")
    if args.describe:
        print(format_sites(describe(qmodel)))
    print(f"{args.model} FP32:                {fp}")
    print(f"{args.model} {recipe.name} W{args.w_bits}A{args.a_bits}: {q}  "
          f"(quantized in {seconds:.1f}s on {num} calibration images)")
    if args.save:
        _save_packed(qmodel, args.save, recipe, args)
    if args.output:
        _write_json(args.output, dict(model=args.model, recipe=recipe.name, recipe_version=recipe.version,
                                      w_bits=args.w_bits, a_bits=args.a_bits, fp_top1=fp.top1, top1=q.top1,
                                      top5=q.top5, eval_images=q.n, calib_images=num, seconds=seconds,
                                      saved=str(args.save) if args.save else None))
    return 0


def _save_packed(qmodel: torch.nn.Module, path: Path, recipe, args: argparse.Namespace) -> Path:
    """Write ``qmodel`` as a packed low-bit checkpoint that names its recipe and bit-widths; prints where."""
    from .export import save_quantized
    path = save_quantized(qmodel, path, recipe={"name": recipe.name, "version": recipe.version,
                                                "w_bits": args.w_bits, "a_bits": args.a_bits})
    print(f"packed W{args.w_bits}A{args.a_bits} checkpoint written to {path} ({path.stat().st_size / 1e6:.2f} MB); "
          f"`qvit export --quantized {path} --out FILE.onnx` converts it")
    return path


def cmd_qat(args: argparse.Namespace) -> int:
    from .qat import quantize_qat
    s = _Session(args)
    recipe = _load_recipe(args.recipe, args.budget)
    if args.calib_images:
        recipe.calibration = {**recipe.calibration, "num_images": args.calib_images}
    if recipe.kind != "qat":
        raise ValueError(f"recipe {recipe.name!r} is a {recipe.kind} recipe; `qvit qat` runs: "
                         f"{', '.join(list_recipes('qat'))}")
    if args.budget == "full" and args.epochs is None and recipe.quick:
        quick = recipe.quick_variant().train
        print(f"qvit qat: {recipe.name} trains for its published {recipe.train.get('epochs')} epochs; "
              f"--budget quick trains {quick.get('epochs')} (or set --epochs)", file=sys.stderr)
    train_set = subset(build_dataset(args.data, "train", s.transform), args.train_images, s.seed)
    loader = s.loader(s.eval_set(materialize=True))
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.train_batch_size),
                                   ("warmup_epochs", args.warmup_epochs), ("seed", args.train_seed),
                                   ("checkpoint_every", args.checkpoint_every),
                                   ("soft_labels", str(args.soft_labels) if args.soft_labels else None))
                 if v is not None}
    out_dir = args.out or Path("outputs") / "qat" / f"{recipe.name}_w{args.w_bits}a{args.a_bits}"
    qmodel, result = quantize_qat(s.model, recipe, train_set, eval_loader=loader, w_bits=args.w_bits,
                                  a_bits=args.a_bits, overrides=_overrides(args), train_overrides=overrides,
                                  out_dir=out_dir, resume=args.resume, progress=s.progress)
    q = evaluate(qmodel, loader, progress=False)
    print(f"{args.model} FP32:                {fp}")
    print(f"{args.model} {recipe.name} W{args.w_bits}A{args.a_bits}: {q}  ({result['steps']} steps, "
          f"{result['seconds']:.0f}s; run directory {out_dir})")
    packed = _save_packed(qmodel, Path(out_dir) / PACKED_NAME, recipe, args)
    record = dict(model=args.model, recipe=recipe.name, recipe_version=recipe.version, w_bits=args.w_bits,
                  a_bits=args.a_bits, fp_top1=fp.top1, top1=q.top1, eval_images=q.n, train_overrides=overrides,
                  packed=str(packed), **result)
    _write_json(Path(out_dir) / "result.json", record)
    if args.output:
        _write_json(args.output, record)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import load_quantized, save_quantized
    from .export.onnx_export import compare_onnx, export_onnx
    s = _Session(args)
    qmodel = load_quantized(args.quantized, s.model if args.checkpoint or args.model != REFERENCE_MODEL else None)
    fmt = args.format or ("onnx" if str(args.out).endswith(".onnx") else "qvit")
    example = next(iter(s.loader(subset(s.eval_set(), 8, s.seed))))[0]
    if fmt == "qvit":
        path = save_quantized(qmodel, args.out, recipe=qmodel.qvit_packed.get("recipe"))
    else:
        path = export_onnx(qmodel, args.out, example, opset=args.opset, unsigned_weights=args.unsigned_weights)
        diff = compare_onnx(qmodel, path, example)
        fused = compare_onnx(qmodel, path, example, optimize=True)
        print(f"onnxruntime vs PyTorch on {example.shape[0]} images: max |logit difference| {diff:.2e} "
              f"(ONNX semantics), {fused:.2e} (onnxruntime's fused integer kernels)")
    print(f"{args.model} {args.quantized} written to {path} ({fmt}, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_softlabels(args: argparse.Namespace) -> int:
    from .qat.multicrop import save_soft_labels
    s = _Session(args)
    train_set = subset(build_dataset(args.data, "train", s.transform), args.train_images, s.seed)
    path = save_soft_labels(s.model, train_set, args.out, crops=args.crops, scale=tuple(args.crop_scale),
                            topk=args.topk, seed=s.seed, batch_size=args.batch_size, progress=s.progress)
    print(f"soft labels of {len(train_set)} images x {args.crops} crops written to {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.qat_report import write_report
    path = write_report(args.run_dir, args.out)
    print(path.read_text())
    print(f"report written to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    t_start = time.time()
    s = _Session(args)
    recipes = args.recipes or list_recipes("ptq")
    eval_ds = s.eval_set(materialize=True)
    loader = s.loader(eval_ds)
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    results: Dict[str, Dict[int, float]] = {}
    runs = [(r, b) for r in recipes for b in args.bits]
    calib_cache: Dict[tuple, torch.Tensor] = {}
    shortened: Dict[str, str] = {}
    from tqdm import tqdm
    bar = tqdm(runs, desc="demo", disable=not s.progress, file=sys.stderr)
    for name, bits in bar:
        bar.set_postfix_str(f"{name} W{bits}A{bits}")
        recipe = _load_recipe(name, args.budget)
        if recipe.name != name:
            shortened[name] = _budget_summary(load_recipe(name))
        num = args.calib_images or recipe.calibration.get("num_images", 32)
        key = (num, recipe.calibration.get("seed", 0))
        if key not in calib_cache:
            calib_cache[key] = s.calib_images(*key)
        qmodel = quantize_ptq(s.model, recipe, calib_cache[key], w_bits=bits, a_bits=bits,
                              overrides=_overrides(args), progress=False)
        res = evaluate(qmodel, loader, progress=False)
        results.setdefault(name, {})[bits] = res.top1
    bar.close()
    elapsed = time.time() - t_start
    print(_demo_table(args.model, fp.top1, results, args.bits, fp.n))
    if shortened:
        print("\nquick budget (--budget full runs the published one):")
        for name, summary in shortened.items():
            print(f"  {name}: {summary}")
    print(f"\n{len(runs)} quantized models evaluated in {elapsed:.0f}s")
    if args.output:
        _write_json(args.output, dict(model=args.model, fp_top1=fp.top1, eval_images=fp.n, bits=list(args.bits),
                                      top1=results, seconds=elapsed, budget=args.budget,
                                      quick=shortened))
    return 0


def _budget_summary(recipe) -> str:
    """``calibration num_images 1024 -> 256; reconstruct iters ... -> 40`` for a recipe with a quick budget."""
    parts = []
    for key, value in (recipe.quick.get("calibration") or {}).items():
        parts.append(f"calibration {key} {recipe.calibration.get(key)} -> {value}")
    full = {name: params for name, params in recipe.steps}
    for step, patch in (recipe.quick.get("steps") or {}).items():
        for key, value in patch.items():
            parts.append(f"{step} {key} {full[step].get(key, 'default')} -> {value}")
    return "; ".join(parts)


def _demo_table(model: str, fp: float, results: Dict[str, Dict[int, float]], bits: Sequence[int], n: int) -> str:
    cols = [f"W{b}A{b}" for b in bits]
    header = "| method | " + " | ".join(cols) + " |"
    lines = [f"{model}: top-1 (%) on {n} test images, FP32 {fp:.2f}", "", header,
             "|" + "---|" * (len(cols) + 1), "| FP32 | " + " | ".join(f"{fp:.2f}" for _ in cols) + " |"]
    for name, by_bits in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_bits[b]:.2f}" for b in bits) + " |")
    return "\n".join(lines)


def cmd_recipes(args: argparse.Namespace) -> int:
    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:14s} {r.kind}  v{r.version}  {r.description}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    model = build_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                        num_classes=args.num_classes)
    config = load_recipe(args.recipe).quant_config(args.w_bits, args.a_bits, _overrides(args))
    prepare(model, config)
    print(format_sites(describe(model)))
    return 0


def _write_json(path: Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvit", description="Low-bit quantization of vision transformers on timm models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="quantize the reference model with every PTQ recipe and print a table")
    _add_model_args(demo)
    _add_quant_args(demo, multi=True)
    demo.add_argument("--output", type=Path, help="also write the results as JSON")
    demo.set_defaults(func=cmd_demo, eval_images=DEMO_EVAL_IMAGES)

    ev = sub.add_parser("eval", help="evaluate a float model")
    _add_model_args(ev)
    ev.set_defaults(func=cmd_eval)

    ptq = sub.add_parser("ptq", help="post-training quantization with a recipe, then evaluation")
    _add_model_args(ptq)
    _add_quant_args(ptq)
    ptq.add_argument("--describe", action="store_true", help="print every quantized site")
    ptq.add_argument("--save", type=Path, help="also write the quantized model as a packed low-bit checkpoint "
                                               "(.safetensors; `qvit export --quantized` converts it to ONNX)")
    ptq.add_argument("--output", type=Path, help="also write the result as JSON")
    ptq.set_defaults(func=cmd_ptq)

    qat = sub.add_parser("qat", help="quantization-aware training with a recipe (lsq, nagel_dampen, ...)")
    _add_model_args(qat)
    _add_quant_args(qat, kind="qat")
    t = qat.add_argument_group("training (defaults: the recipe's)")
    t.add_argument("--epochs", type=float, help="the recipe's warm-up, cool-down and late stages scale with it")
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-epochs", type=float)
    t.add_argument("--train-batch-size", type=int, help="without --lr, the recipe's lr scales linearly with it")
    t.add_argument("--train-images", type=int, help="train on a seeded subset of this many images")
    t.add_argument("--train-seed", type=int, help="seed of the data order and augmentation")
    t.add_argument("--soft-labels", type=Path, help="precomputed multi-crop soft labels (`qvit softlabels`)")
    t.add_argument("--out", type=Path, help="run directory (default: outputs/qat/<recipe>_w<W>a<A>); the trained "
                                            f"model is written there as a packed checkpoint, {PACKED_NAME}")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (default: 200; "
                                                        "one is also written at the end of every epoch)")
    qat.add_argument("--output", type=Path, help="also write the result as JSON")
    qat.set_defaults(func=cmd_qat)

    ex = sub.add_parser("export", help="convert a packed checkpoint (from `qvit ptq --save` or `qvit qat`) to ONNX, "
                                       "checked in onnxruntime, or rewrite it")
    _add_model_args(ex)
    ex.add_argument("--quantized", type=Path, required=True,
                    help="the packed checkpoint: `qvit ptq --save FILE`, or RUN_DIR/" + PACKED_NAME + " of `qvit qat`")
    ex.add_argument("--format", choices=("qvit", "onnx"),
                    help="qvit: packed safetensors checkpoint; onnx: QDQ ONNX (default: from --out's suffix)")
    ex.add_argument("--out", type=Path, required=True, help="file to write (.safetensors or .onnx)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    ex.add_argument("--unsigned-weights", action="store_true",
                    help="store weight codes as uint8: exact integer arithmetic in onnxruntime on x86 CPUs without "
                         "VNNI (whose fast int8 kernels can saturate), at about float32 speed")
    ex.set_defaults(func=cmd_export)

    sl = sub.add_parser("softlabels", help="precompute multi-crop soft labels of the float model (for vvtq)")
    _add_model_args(sl)
    sl.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    sl.add_argument("--crops", type=int, default=16, help="random-resized crops stored per image")
    sl.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], help="crop area range")
    sl.add_argument("--topk", type=int, help="keep the k largest probabilities per crop (FKD's marginal smoothing)")
    sl.add_argument("--train-images", type=int, help="a seeded subset of the training set (must match qat's)")
    sl.set_defaults(func=cmd_softlabels)

    rep = sub.add_parser("report", help="tables and plots of a QAT run directory (oscillation over training)")
    rep.add_argument("run_dir", type=Path, help="the --out directory of a `qvit qat` run")
    rep.add_argument("--out", type=Path, help="where to write report.md and the plots (default: RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)

    rec = sub.add_parser("recipes", help="list the shipped recipes")
    rec.set_defaults(func=cmd_recipes)

    desc = sub.add_parser("describe", help="list every quantization site a recipe gives a model")
    desc.add_argument("--model", default=REFERENCE_MODEL)
    desc.add_argument("--checkpoint", type=Path)
    desc.add_argument("--pretrained", action="store_true")
    desc.add_argument("--num-classes", type=int)
    desc.add_argument("--recipe", default="minmax")
    desc.add_argument("--w-bits", type=int, default=8)
    desc.add_argument("--a-bits", type=int, default=8)
    desc.add_argument("--config", type=Path)
    desc.set_defaults(func=cmd_describe)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if os.environ.get("QVIT_DEBUG"):
        return args.func(args)
    try:
        return args.func(args)
    except (DatasetMissingError, FileNotFoundError, FileExistsError, KeyError, ValueError, WeightsUnavailableError,
            NotCalibratedError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"qvit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
