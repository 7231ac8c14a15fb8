"""The QAT table on the reference model: every QAT recipe at W2A2 and W3A3 (optionally W4A4) with the same epoch budget,
final top-1 (mean of the seeds) and final fraction of oscillating weights; then the effect of batch-norm
re-estimation on a small MobileNetV2-style CNN (28x28) trained here.

    python benchmarks/qat_table.py --epochs 2                    # all QAT recipes, W2A2 and W3A3, seeds 0 1
    python benchmarks/qat_table.py --recipes lsq nagel_freeze --bits 2 --epochs 1 --train-images 6000

Not a test: hours on a small CPU. Every finished run (its qvit qat run directory under --work-dir, with metrics and
checkpoints) is recorded in ``<out>.partial.jsonl``; re-running the command skips finished runs and resumes an
interrupted one from its last checkpoint. Runs made with other reference weights, epochs or data sizes, or with an
earlier version of their recipe, are not reused (run directories are named by a hash of those settings and the recipe
version). Writes ``<out>.md`` / ``<out>.json`` (default benchmarks/results/qat_table).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

import timm
import torch

import qvit
from qvit.data import build_dataset, create_loader, subset
from qvit.data.transforms import create_eval_transform
from qvit.qat import quantize_qat
from qvit.models import reference_weights_id
from qvit.report import append_run, load_runs, settings_tag, write_benchmark_record

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=qvit.list_recipes("qat"))
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=float, default=2.0, help="the same budget for every recipe")
    p.add_argument("--batch-size", type=int, help="training batch for every recipe (default: each recipe's, 128); "
                                                  "the recipes' learning rates scale linearly with it")
    p.add_argument("--train-images", type=int, help="a seeded subset of the 60k training images")
    p.add_argument("--eval-images", type=int, help="a seeded subset of the 10k test images")
    p.add_argument("--bn-epochs", type=float, default=1.0, help="QAT epochs of the CNN batch-norm comparison "
                                                                "(0 skips it)")
    p.add_argument("--parts", nargs="+", choices=("vit", "cnn"), default=["vit", "cnn"],
                   help="the ViT recipe table, the CNN batch-norm comparison, or both (separate processes can share "
                        "the work: e.g. one per set of --recipes with --parts vit, then one with both parts)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/qat_table"))
    p.add_argument("--out", type=Path, default=RESULTS / "qat_table", help="output path without suffix")
    return p.parse_args(argv)


def _eval_loader(model: torch.nn.Module, eval_images) -> List:
    test = subset(build_dataset(None, "val", create_eval_transform(model)), eval_images, 0)
    xs, ys = zip(*create_loader(test, batch_size=500))
    return list(zip(torch.cat(xs).split(500), torch.cat(ys).split(500)))


def run_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What a finished run depends on besides its recipe, bits and seed."""
    settings = dict(weights=reference_weights_id(), epochs=args.epochs, train_images=args.train_images,
                    eval_images=args.eval_images, bn_epochs=args.bn_epochs)
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    return settings


def train_overrides(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    """The settings every ViT recipe shares in this table: epoch budget, seed and, when given, the batch."""
    patch = {"epochs": args.epochs, "seed": seed}
    if args.batch_size:
        patch["batch_size"] = args.batch_size
    return patch


def reversal_stats(run_dir: Path) -> Dict[str, float]:
    """From a run's last per-layer oscillation record, weight-count-weighted: ``repeat_reversal_fraction``, the
    fraction of weights whose integer code reversed direction at least 4 times over the run, and
    ``reversed_last_step``, the fraction that reversed in the final optimizer step. Unlike the EMA frequency these
    do not need a run much longer than the EMA's time constant (1 / momentum steps)."""
    path = run_dir / "oscillation.jsonl"
    if not path.exists():
        return {}
    layers = json.loads(path.read_text().splitlines()[-1])["layers"]
    total = sum(r["n"] for r in layers)
    return {"repeat_reversal_fraction": sum(sum(r["reversal_hist"][3:]) for r in layers) / total,
            "reversed_last_step": sum(r["reversed_last_step"] * r["n"] for r in layers) / total}


def window_stats(run_dir: Path) -> Dict[str, Any]:
    """Oscillation at the end of a run, from the per-weight reversal counts in its last two checkpoints:
    ``window_reversed_fraction``, the fraction of tracked weights whose code reversed direction at least once between
    them, and ``window_steps``, their optimizer steps. Unlike the EMA frequency and the whole-run counts, this sees
    the final stage of a schedule (OFQ's CGA, the last freezing thresholds) even when it is short."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else []
    if len(ckpts) < 2:
        return {}
    first, last = (torch.load(c / "pytorch_model.bin", map_location="cpu", weights_only=True) for c in ckpts[-2:])
    reversed_, total = 0, 0
    for key, count in last.items():
        if key.endswith(".oscillation.reversals") and key in first:
            reversed_ += int((count - first[key] >= 1).sum())
            total += count.numel()
    if not total:
        return {}
    return {"window_reversed_fraction": reversed_ / total,
            "window_steps": [int(c.name.rsplit("_", 1)[1]) for c in ckpts[-2:]]}


def metrics_rows(run_dir: Path) -> List[Dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (one per logged optimizer step); empty if the run has none."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curve_stats(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """From a run's metrics rows: ``peak_osc_fraction``, the largest fraction of oscillating weights (EMA frequency
    above the report threshold) logged during training, and ``peak_osc_step``, the optimizer step where it was."""
    if not rows:
        return {}
    step, peak = max(((r["step"], r.get("osc_fraction") or 0.0) for r in rows), key=lambda t: t[1])
    return {"peak_osc_fraction": peak, "peak_osc_step": step}


def ema_note(recipe: str, steps: int) -> str:
    """What the EMA oscillation frequency of ``recipe``'s tracker can show in a run of ``steps`` optimizer steps."""
    tracking = dict(qvit.load_recipe(recipe).callbacks).get("track_oscillations", {})
    m, thr = tracking.get("momentum", 0.001), tracking.get("report_threshold", 0.005)
    ceiling = 1.0 - (1.0 - m) ** steps                 # a weight that reverses in every step
    return (f"Each run is {steps} optimizer steps. The EMA frequency (momentum {m:g}, a time constant of {1 / m:.0f} "
            f"steps) reaches at most {ceiling:.3f} in {steps} steps, and the threshold {thr:g} counts only weights "
            f"with at least {math.ceil(thr / m)} recent reversals; the reversal counts measure oscillation without "
            "that warm-up.")


def seed_runs(done: Dict[str, Dict[str, Any]], name: str, bits: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """The finished ViT runs of one recipe at ``bits`` (weights and activations), one per seed."""
    return [done[f"{name}/W{bits}A{bits}/seed{s}"] for s in seeds]


#: the per-run oscillation measures beside the final EMA fraction: (record field, column label, decimals)
REVERSAL_COLUMNS = (("repeat_reversal_fraction", ">= 4 reversals", 3), ("reversed_last_step", "reversed in the last step", 4),
                    ("peak_osc_fraction", "peak osc. in training", 3),
                    ("window_reversed_fraction", "reversed in the last checkpoint interval", 3))


def measured_seeds(done: Dict[str, Dict[str, Any]], args: argparse.Namespace, bits: int, field: str) -> List[int]:
    """The seeds at which every recipe's run at ``bits`` has ``field`` (older runs may lack a newer measure)."""
    return [s for s in args.seeds if all(field in seed_runs(done, n, bits, [s])[0] for n in args.recipes)]


def expectation_lines(done: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    """The issue's expectation at each bit width: anti-oscillation recipes end with fewer oscillating weights than
    ``lsq`` and at least its top-1; measured, not assumed, on the final EMA fraction and, at the seeds where every
    recipe has them, on the fraction of weights with at least 4 reversals and of weights reversed in the last
    checkpoint interval."""
    def mean(name, b, field, seeds):
        return statistics.mean(r.get(field) or 0 for r in seed_runs(done, name, b, seeds))
    out = []
    for b in args.bits:
        if "lsq" not in args.recipes:
            break
        fields = [("osc_fraction", "final EMA", args.seeds)]
        for field, label in (("repeat_reversal_fraction", ">= 4 reversals"),
                             ("window_reversed_fraction", "reversed in the last checkpoint interval")):
            seeds = measured_seeds(done, args, b, field)
            if seeds:
                fields.append((field, label + ("" if seeds == args.seeds else f", seeds {seeds}"), seeds))
        for name in (n for n in ("nagel_dampen", "nagel_freeze", "ofq") if n in args.recipes):
            d_top1 = mean(name, b, "top1", args.seeds) - mean("lsq", b, "top1", args.seeds)
            parts = [f"top-1 {d_top1:+.2f} points"]
            for field, label, seeds in fields:
                d_osc = 100 * (mean(name, b, field, seeds) - mean("lsq", b, field, seeds))
                verdict = "met" if d_top1 >= 0 and d_osc < 0 else "not met"
                parts.append(f"oscillating weights ({label}) {d_osc:+.4f} points: {verdict}")
            out.append(f"- W{b}A{b} {name} vs lsq: " + "; ".join(parts))
    return out


def vit_runs(args: argparse.Namespace, done: Dict[str, Dict[str, Any]], partial: Path) -> Dict[str, Any]:
    model = qvit.create_reference_model()
    loader = _eval_loader(model, args.eval_images)
    fp = qvit.evaluate(model, loader, progress=False).top1
    train = subset(build_dataset(None, "train", create_eval_transform(model)), args.train_images, 0)
    for name in args.recipes:
        version = qvit.load_recipe(name).version
        for bits in args.bits:
            for seed in args.seeds:
                key = f"{name}/W{bits}A{bits}/seed{seed}"
                if key in done and done[key].get("recipe_version", 1) == version:
                    continue
                run_dir = args.work_dir / settings_tag(run_settings(args)) / f"{key.replace('/', '_')}_v{version}"
                resume = (run_dir / "checkpoints").exists()
                qmodel, result = quantize_qat(model, name, train, eval_loader=loader, w_bits=bits, a_bits=bits,
                                              train_overrides=train_overrides(args, seed),
                                              out_dir=run_dir, resume=resume)
                top1 = qvit.evaluate(qmodel, loader, progress=False).top1
                rows = metrics_rows(run_dir)
                rec = dict(key=key, recipe=name, recipe_version=version, bits=bits, seed=seed, top1=top1,
                           steps=result["steps"],
                           seconds=result["seconds"], osc_fraction=rows[-1].get("osc_fraction"),
                           frozen_fraction=rows[-1].get("frozen_fraction"), run_dir=str(run_dir),
                           **reversal_stats(run_dir), **curve_stats(rows), **window_stats(run_dir))
                done[key] = append_run(partial, rec, run_settings(args))
                print(f"{key}: top-1 {top1:.2f}%, oscillating {100 * (rec['osc_fraction'] or 0):.3f}%", flush=True)
    return {"fp_top1": fp, "eval_images": sum(len(y) for _, y in loader)}


def bn_runs(args: argparse.Namespace, done: Dict[str, Dict[str, Any]], partial: Path) -> None:
    """A MobileNetV2-style CNN (timm mobilenetv2_050, 1 input channel, output stride 8 so the last feature map
    of a small image keeps 4x4 positions) trained in float for 3 epochs, then ``nagel_dampen`` W4A4 QAT with
    and without batch-norm re-estimation before evaluation."""
    key_fp = "cnn/fp"
    bn_keys = [f"cnn/nagel_dampen/W4A4/bn_reestimation={bn}" for bn in (False, True)]
    if all(k in done for k in bn_keys):            # finished: the float model's top-1 is in the records
        done[key_fp] = {"key": key_fp, "top1": done[bn_keys[0]]["fp_top1"]}
        return
    cnn = timm.create_model("mobilenetv2_050", in_chans=1, num_classes=10, output_stride=8)
    transform = create_eval_transform(qvit.create_reference_model())
    train = subset(build_dataset(None, "train", transform), args.train_images, 0)
    loader = _eval_loader(qvit.create_reference_model(), args.eval_images)
    fp_dir = args.work_dir / settings_tag(run_settings(args)) / "cnn_fp"
    from qvit.qat import QATTrainer, TrainConfig
    cfg = TrainConfig(epochs=3, batch_size=128, lr=2e-3, weight_decay=1e-4, loss="ce", warmup_epochs=0.2)
    trainer = QATTrainer(cnn, None, train, eval_loader=loader, config=cfg, out_dir=fp_dir)
    trainer.fit(resume=(fp_dir / "checkpoints").exists())
    fp = qvit.evaluate(cnn.eval(), loader, progress=False).top1
    done[key_fp] = {"key": key_fp, "top1": fp}
    recipe = qvit.load_recipe("nagel_dampen")
    for bn, key in zip((False, True), bn_keys):
        if key in done:
            continue
        if bn:   # re-estimated before every evaluation, the final one included
            recipe.callbacks = recipe.callbacks + [("bn_reestimation", {"num_batches": 50})]
        run_dir = args.work_dir / settings_tag(run_settings(args)) / key.replace("/", "_").replace("=", "_")
        qmodel, result = quantize_qat(cnn, recipe, train, eval_loader=loader, w_bits=4, a_bits=4,
                                      train_overrides={"epochs": args.bn_epochs}, out_dir=run_dir,
                                      resume=(run_dir / "checkpoints").exists())
        top1 = qvit.evaluate(qmodel, loader, progress=False).top1
        rec = dict(key=key, bn_reestimation=bn, top1=top1, fp_top1=fp, steps=result["steps"])
        done[key] = append_run(partial, rec, run_settings(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")
    if args.threads:
        torch.set_num_threads(args.threads)
    done = load_runs(partial, run_settings(args))
    info = vit_runs(args, done, partial) if "vit" in args.parts else None
    with_cnn = args.bn_epochs > 0 and "cnn" in args.parts
    if with_cnn:
        bn_runs(args, done, partial)
    if info is None:
        return 0
    lines = ["| method | " + " | ".join(f"W{b}A{b} top-1 | W{b}A{b} osc. (%)" for b in args.bits) + " |",
             "|---|" + "---|---|" * len(args.bits),
             "| FP32 | " + " | ".join(f"{info['fp_top1']:.2f} | -" for _ in args.bits) + " |"]
    for name in args.recipes:
        cells = []
        for b in args.bits:
            recs = seed_runs(done, name, b, args.seeds)
            cells.append(f"{statistics.mean(r['top1'] for r in recs):.2f} | "
                         f"{100 * statistics.mean(r['osc_fraction'] or 0 for r in recs):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for rec in done.values():      # runs recorded before these measures were: read them from their run directory
        if "recipe" in rec and rec.get("run_dir") and Path(rec["run_dir"]).exists():
            if "peak_osc_fraction" not in rec:
                rec.update(curve_stats(metrics_rows(Path(rec["run_dir"]))))
            if "window_reversed_fraction" not in rec:
                rec.update(window_stats(Path(rec["run_dir"])))
    columns = [(field, label, digits) for field, label, digits in REVERSAL_COLUMNS
               if any(measured_seeds(done, args, b, field) for b in args.bits)]
    reversal_lines = []
    if columns:
        reversal_lines = ["", "| method | " + " | ".join(f"W{b}A{b} {label} (%)" for b in args.bits
                                                         for _, label, _ in columns) + " |",
                          "|---|" + "---|" * (len(columns) * len(args.bits))]
        for name in args.recipes:
            cells = []
            for b in args.bits:
                for field, _, digits in columns:
                    seeds = measured_seeds(done, args, b, field)
                    value = statistics.mean(r[field] for r in seed_runs(done, name, b, seeds)) if seeds else None
                    cells.append("-" if value is None else f"{100 * value:.{digits}f}" + (
                        "" if seeds == args.seeds else f" (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"))
            reversal_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shown = {field for field, _, _ in columns}
    steps = max(r.get("steps", 0) for r in done.values() if "recipe" in r)
    peak_note = (" The peak column is the largest fraction logged during training: once the learning rate has annealed, "
                 "weights stop crossing rounding thresholds and the EMA decays, so the final fraction lies below it."
                 if "peak_osc_fraction" in shown else "")
    windows = sorted({tuple(r["window_steps"]) for r in done.values() if "recipe" in r and "window_steps" in r})
    window_note = (" The last-checkpoint-interval column counts the weights whose code reversed at least once between "
                   "the run's last two "
                   f"checkpoints (steps {', '.join(f'{a}-{b}' for a, b in windows)}), the end of the schedule, where "
                   "OFQ's confidence-guided annealing and the lowest freezing thresholds act. A value that names its "
                   "seeds is the mean over those: the other seeds' runs were made before a measure existed." if "window_reversed_fraction" in shown else "")
    ofq_note = (" ofq's fractions are over the values it rounds: fc1, fc2, proj, the value rows of qkv and the product "
                "W_q^T W_k of every head (query-key reparameterization); the other recipes round all of qkv."
                if "ofq" in args.recipes else "")
    notes = ["", ema_note(args.recipes[0], steps) + peak_note + window_note + ofq_note, "",
             "Against the expectation (anti-oscillation recipes: fewer oscillating weights than lsq and at least its "
             "top-1):", ""] + expectation_lines(done, args)
    bn_lines = []
    if with_cnn:
        bn_lines = ["", "| MobileNetV2-style CNN, nagel_dampen W4A4 | top-1 |", "|---|---|",
                    f"| FP32 | {done['cnn/fp']['top1']:.2f} |"]
        for bn in (False, True):
            bn_lines.append(f"| BN re-estimation {'on' if bn else 'off'} | "
                            f"{done[f'cnn/nagel_dampen/W4A4/bn_reestimation={bn}']['top1']:.2f} |")
    command = ("python benchmarks/qat_table.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    data = dict(command=command, settings=run_settings(args), seeds=args.seeds, runs=list(done.values()), **info)
    md = write_benchmark_record(args.out, data, f"# QAT table: {qvit.REFERENCE_MODEL} on Fashion-MNIST\n\nCommand: `{command}`\n\n"
          f"{args.epochs} epochs for every recipe"
          f"{f' at batch {args.batch_size} (learning rates scaled linearly with the batch)' if args.batch_size else ''}"
          f"; top-1 on {info['eval_images']} test images and the final fraction "
          f"of weights with oscillation frequency > 0.005, means over seeds {args.seeds}.\n\n" + "\n".join(lines) + "\n"
          + "\n".join(reversal_lines + notes) + "\n" + "\n".join(bn_lines))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
