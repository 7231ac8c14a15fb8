"""``qvit qat``: quantization-aware training with a recipe, written as a run directory and a packed model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..api import quantize
from ..evaluate import evaluate
from ..recipes import list_recipes
from ._common import (COMMANDS, PACKED_NAME, Command, _add_model_args, _add_quant_args, _load_recipe, _overrides,
                      _save_packed, _Session, _write_json)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit qat``."""
    p = subparsers.add_parser("qat", help="quantization-aware training with a recipe (lsq, nagel_dampen, ...)")
    _add_model_args(p)
    _add_quant_args(p, pipeline="qat")
    t = p.add_argument_group("training (defaults: the recipe's)")
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
    p.add_argument("--output", type=Path, help="also write the result as JSON")
    return p


def _train_overrides(args: argparse.Namespace) -> dict:
    """The training settings given on the command line, by their recipe ``train`` keys."""
    given = (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.train_batch_size),
             ("warmup_epochs", args.warmup_epochs), ("seed", args.train_seed),
             ("checkpoint_every", args.checkpoint_every),
             ("soft_labels", str(args.soft_labels) if args.soft_labels else None))
    return {k: v for k, v in given if v is not None}


def run(args: argparse.Namespace) -> int:
    """Train with ``--recipe`` into the run directory, evaluate, write the packed model and ``result.json``."""
    s = _Session(args)
    recipe = _load_recipe(args.recipe, args.budget)
    if args.calib_images:
        recipe.calibration = {**recipe.calibration, "num_images": args.calib_images}
    if recipe.pipeline != "qat":
        raise ValueError(f"recipe {recipe.name!r} is a {recipe.pipeline} recipe; `qvit qat` runs: "
                         f"{', '.join(list_recipes('qat'))}")
    if args.budget == "full" and args.epochs is None and recipe.quick:
        quick = recipe.quick_variant().train
        print(f"qvit qat: {recipe.name} trains for its published {recipe.train.get('epochs')} epochs; "
              f"--budget quick trains {quick.get('epochs')} (or set --epochs)", file=sys.stderr)
    train_set = s.train_set(args.train_images)
    loader = s.loader(s.eval_set(materialize=True))
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    train_overrides = _train_overrides(args)
    out_dir = args.out or Path("outputs") / "qat" / f"{recipe.name}_w{args.w_bits}a{args.a_bits}"
    res = quantize(s.model, recipe, train_set, w_bits=args.w_bits, a_bits=args.a_bits, overrides=_overrides(args),
                   progress=s.progress, eval_loader=loader, train_overrides=train_overrides, out_dir=out_dir,
                   resume=args.resume)
    training = res.training
    q = evaluate(res.model, loader, progress=False)
    print(f"{args.model} FP32:                {fp}")
    print(f"{args.model} {recipe.name} W{args.w_bits}A{args.a_bits}: {q}  ({training['steps']} steps, "
          f"{training['seconds']:.0f}s; run directory {out_dir})")
    packed = _save_packed(res.model, Path(out_dir) / PACKED_NAME, recipe, args)
    record = dict(model=args.model, recipe=recipe.name, recipe_version=recipe.version, w_bits=args.w_bits,
                  a_bits=args.a_bits, fp_top1=fp.top1, top1=q.top1, eval_images=q.n, train_overrides=train_overrides,
                  packed=str(packed), **training)
    _write_json(Path(out_dir) / "result.json", record)
    if args.output:
        _write_json(args.output, record)
    return 0


COMMANDS.add("qat", Command(add_parser, run))
