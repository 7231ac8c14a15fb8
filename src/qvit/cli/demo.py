"""``qvit demo``: the reference model under every PTQ recipe at a few bit-widths, as one table."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import torch

from ..api import quantize
from ..evaluate import evaluate
from ..recipes import Recipe, list_recipes, load_recipe
from ._common import (COMMANDS, DEMO_EVAL_IMAGES, Command, _add_model_args, _add_quant_args, _load_recipe,
                      _overrides, _require_ptq, _Session, _write_json)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit demo``."""
    p = subparsers.add_parser("demo", help="quantize the reference model with every PTQ recipe and print a table")
    _add_model_args(p)
    _add_quant_args(p, multi=True)
    p.add_argument("--output", type=Path, help="also write the results as JSON")
    p.set_defaults(eval_images=DEMO_EVAL_IMAGES)
    return p


def run(args: argparse.Namespace) -> int:
    """Quantize with each of ``--recipes`` at each of ``--bits``, evaluate, print the table."""
    t_start = time.time()
    s = _Session(args)
    recipes = args.recipes or list_recipes("ptq")
    loader = s.loader(s.eval_set(materialize=True))
    fp = evaluate(s.model, loader, progress=s.progress, desc="eval FP32")
    results: Dict[str, Dict[int, float]] = {}
    runs = [(r, b) for r in recipes for b in args.bits]
    calib_cache: Dict[tuple, torch.Tensor] = {}
    shortened: Dict[str, str] = {}
    from tqdm import tqdm
    bar = tqdm(runs, desc="demo", disable=not s.progress, file=sys.stderr)
    for name, bits in bar:
        bar.set_postfix_str(f"{name} W{bits}A{bits}")
        recipe = _require_ptq(_load_recipe(name, args.budget))
        if recipe.name != name:
            shortened[name] = _budget_summary(load_recipe(name))
        num = args.calib_images or recipe.calibration.get("num_images", 32)
        key = (num, recipe.calibration.get("seed", 0))
        if key not in calib_cache:
            calib_cache[key] = s.calib_images(*key)
        qmodel = quantize(s.model, recipe, calib_cache[key], w_bits=bits, a_bits=bits, overrides=_overrides(args),
                          progress=False).model
        results.setdefault(name, {})[bits] = evaluate(qmodel, loader, progress=False).top1
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
                                      top1=results, seconds=elapsed, budget=args.budget, quick=shortened))
    return 0


def _budget_summary(recipe: Recipe) -> str:
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


COMMANDS.add("demo", Command(add_parser, run))
