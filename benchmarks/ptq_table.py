"""The paper-style PTQ table on the reference model: every PTQ recipe at W3A3, W4A4, W6A6 and W8A8, mean and spread
(sample standard deviation) of the top-1 over calibration seeds, and each recipe's quantization wall time.

    python benchmarks/ptq_table.py                                   # published budgets, seeds 0 1 2, 10k test images
    python benchmarks/ptq_table.py --budget quick --recipes minmax repq --seeds 0

Not a test: the full table takes hours on a small CPU (the reconstruction recipes dominate). Every finished run is
appended to ``<out>.partial.jsonl`` at once; re-running the same command skips the runs already there, so an
interrupted table loses at most one run. Runs made with other reference weights, another budget, another number of
test images or an older recipe version are not reused. The record (``<out>.md`` and ``<out>.json``, default
``benchmarks/results/ptq_table``) names the command, the date, the machine and the versions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import qvit
from qvit.data import build_dataset, calibration_batch, create_loader, subset
from qvit.data.transforms import create_eval_transform
from qvit.models import reference_weights_id
from qvit.report import append_run, load_runs, write_benchmark_record

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=qvit.list_recipes("ptq"))
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6, 8], help="each runs as WbAb")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration-set seeds")
    p.add_argument("--budget", choices=("full", "quick"), default="full")
    p.add_argument("--eval-images", type=int, help="a seeded subset of the test set (default: all 10k)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ptq_table", help="output path without suffix")
    return p.parse_args(argv)


def run_key(recipe: str, bits: int, seed: int) -> str:
    return f"{recipe}/W{bits}A{bits}/seed{seed}"


def summarize(records: List[Dict[str, Any]], recipes: List[str], bits: List[int], fp: float) -> str:
    """Markdown: top-1 mean ± std per recipe and bit-width, and the mean quantization time of a run."""
    cols = [f"W{b}A{b}" for b in bits]
    lines = ["| method | " + " | ".join(cols) + " | time / run (s) |", "|" + "---|" * (len(cols) + 2),
             "| FP32 | " + " | ".join(f"{fp:.2f}" for _ in cols) + " | |"]
    for r in recipes:
        cells, secs = [], []
        for b in bits:
            top1 = [x["top1"] for x in records if x["recipe"] == r and x["bits"] == b]
            secs += [x["seconds"] for x in records if x["recipe"] == r and x["bits"] == b]
            if not top1:
                cells.append("-")
            elif len(top1) == 1:
                cells.append(f"{top1[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}")
        cells.append(f"{statistics.mean(secs):.1f}" if secs else "-")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in args.recipes:
        qvit.load_recipe(r)  # unknown names fail before any work
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")

    model = qvit.create_reference_model()
    transform = create_eval_transform(model)
    test = subset(build_dataset(None, "val", transform), args.eval_images, 0)
    xs, ys = zip(*create_loader(test, batch_size=500))
    loader = list(zip(torch.cat(xs).split(500), torch.cat(ys).split(500)))
    train = build_dataset(None, "train", transform)
    fp = qvit.evaluate(model, loader, progress=False)
    print(f"FP32: {fp}", flush=True)
    settings = dict(weights=reference_weights_id(), budget=args.budget, eval_images=fp.n)
    done = load_runs(partial, settings)

    runs = [(r, b, s) for r in args.recipes for b in args.bits for s in args.seeds]
    calib: Dict[tuple, torch.Tensor] = {}
    for i, (name, bits, seed) in enumerate(runs, 1):
        key = run_key(name, bits, seed)
        recipe = qvit.load_recipe(name)
        if key in done and done[key]["recipe_version"] == recipe.version:
            continue
        recipe = recipe.quick_variant() if args.budget == "quick" else recipe
        num = recipe.calibration.get("num_images", 32)
        if (num, seed) not in calib:
            calib[(num, seed)] = calibration_batch(train, num, seed)[0]
        t0 = time.time()
        qmodel = qvit.quantize_ptq(model, recipe, calib[(num, seed)], w_bits=bits, a_bits=bits, progress=True)
        seconds = time.time() - t0
        res = qvit.evaluate(qmodel, loader, progress=False)
        rec = dict(key=key, recipe=name, recipe_version=recipe.version, budget=args.budget, bits=bits, seed=seed,
                   calib_images=num, top1=res.top1, top5=res.top5, eval_images=res.n, seconds=seconds)
        done[key] = append_run(partial, rec, settings)
        print(f"[{i}/{len(runs)}] {key}: top-1 {res.top1:.2f}% (quantized in {seconds:.1f}s)", flush=True)

    records = [done[run_key(*r)] for r in runs]
    command = "python benchmarks/ptq_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = summarize(records, args.recipes, args.bits, fp.top1)
    data = dict(command=command.strip(), model=qvit.REFERENCE_MODEL, weights=settings["weights"], fp_top1=fp.top1,
                eval_images=fp.n, budget=args.budget, seeds=args.seeds, bits=args.bits, recipes=args.recipes,
                runs=records)
    md = write_benchmark_record(args.out, data, f"# PTQ table: {qvit.REFERENCE_MODEL} on Fashion-MNIST\n\nCommand: `{command.strip()}`\n\n"
          f"Top-1 (%) on {fp.n} test images, mean ± sample std over calibration seeds {args.seeds} "
          f"({args.budget} budget); time: quantization wall time of one run, averaged over bit-widths and seeds.\n\n"
          f"{table}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
