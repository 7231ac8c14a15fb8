"""``qvit ptq``: post-training quantization with a recipe, evaluated against the float model."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..api import quantize
from ..evaluate import evaluate
from ..models import describe, format_sites
from ._common import (COMMANDS, Command, _add_model_args, _add_quant_args, _load_recipe, _overrides, _require_ptq,
                      _save_packed, _Session, _write_json)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit ptq``."""
    p = subparsers.add_parser("ptq", help="post-training quantization with a recipe, then evaluation")
    _add_model_args(p)
    _add_quant_args(p)
    p.add_argument("--describe", action="store_true", help="print every quantized site")
    p.add_argument("--save", type=Path, help="also write the quantized model as a packed low-bit checkpoint "
                                             "(.safetensors; `qvit export --quantized` converts it to ONNX)")
    p.add_argument("--output", type=Path, help="also write the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Calibrate and quantize with ``--recipe``, evaluate FP32 and quantized, optionally save the packed model."""
    s = _Session(args)
    recipe = _require_ptq(_load_recipe(args.recipe, args.budget))
    num = args.calib_images or recipe.calibration.get("num_images", 32)
    calib = s.calib_images(num, recipe.calibration.get("seed", 0))
    loader = s.loader(s.eval_set())
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    t0 = time.time()
    qmodel = quantize(s.model, recipe, calib, w_bits=args.w_bits, a_bits=args.a_bits, overrides=_overrides(args),
                      progress=s.progress).model
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


COMMANDS.add("ptq", Command(add_parser, run))
