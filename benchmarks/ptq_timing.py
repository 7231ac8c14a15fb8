"""End-to-end PTQ wall time of the RepQ-ViT, DopQ-ViT and I&S-ViT recipes on a full-size ViT (default
deit_small_patch16_224 at W4A4, random-init weights and random images: only the time is measured).

    python benchmarks/ptq_timing.py                          # repq dopq isvit, 10 reconstruction iterations per unit
    python benchmarks/ptq_timing.py --recon-iters 1000       # I&S-ViT's published budget (hours on a small CPU)

Reconstruction recipes run with ``--recon-iters`` iterations per unit and stage; the record gives the measured time,
its split into cache capture and training, and the training time extrapolated linearly to the recipe's own
iteration count. Writes ``benchmarks/results/ptq_timing.{md,json}`` (command, date, machine, versions).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import timm
import torch

import qvit
from qvit.ptq.steps import PTQContext
from qvit.report import write_benchmark_record

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--recipes", nargs="+", default=["repq", "dopq", "isvit"])
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--recon-iters", type=int, default=10, help="reconstruction iterations per unit and stage")
    p.add_argument("--calib-images", type=int, help="default: each recipe's own count (32, or 1024 for isvit)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ptq_timing", help="output path without suffix")
    return p.parse_args(argv)


def time_recipe(model: torch.nn.Module, name: str, args: argparse.Namespace) -> Dict[str, Any]:
    recipe = qvit.load_recipe(name)
    ctx = PTQContext(model=model, calib_data=torch.zeros(0), a_bits=args.a_bits, w_bits=args.w_bits)
    full_iters = {i: ctx.by_bits(p["iters"]) for i, (step, p) in enumerate(recipe.steps) if step == "reconstruct"}
    recipe.steps = [(step, {**p, "iters": args.recon_iters} if step == "reconstruct" else p)
                    for step, p in recipe.steps]
    num = args.calib_images or recipe.calibration.get("num_images", 32)
    gen = torch.Generator().manual_seed(0)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    calib = torch.randn(num, *size, generator=gen).to(args.device)
    t0 = time.time()
    qmodel = qvit.quantize_ptq(model, recipe, calib, w_bits=args.w_bits, a_bits=args.a_bits, progress=True)
    seconds = time.time() - t0
    log = qvit.quant_state(qmodel).log
    steps = [{"step": r["step"], "seconds": r["seconds"]} for r in log if "seconds" in r and "units" not in r]
    recon = [r for r in log if r["step"] == "reconstruct" and "units" in r]
    capture = sum(u["capture_seconds"] for r in recon for u in r["units"])
    train = sum(u["seconds"] - u["capture_seconds"] for r in recon for u in r["units"])
    full = sum(full_iters.values())
    extrapolated = seconds - train + train * (full / (args.recon_iters * len(full_iters))) if recon else seconds
    return dict(recipe=name, calib_images=num, seconds=seconds, steps=steps, units=sum(len(r["units"]) for r in recon),
                recon_iters=args.recon_iters if recon else None, full_iters=list(full_iters.values()) or None,
                capture_seconds=capture, train_seconds=train, extrapolated_seconds=extrapolated)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    rows: List[Dict[str, Any]] = []
    for name in args.recipes:
        rows.append(time_recipe(model, name, args))
        r = rows[-1]
        print(f"{name}: {r['seconds']:.1f}s (extrapolated to the published budget: {r['extrapolated_seconds']:.0f}s)",
              flush=True)
    command = ("python benchmarks/ptq_timing.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    lines = ["| recipe | calib images | measured (s) | capture (s) | training (s) | iters/unit timed | "
             "published iters/unit | extrapolated (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['calib_images']} | {r['seconds']:.1f} | {r['capture_seconds']:.1f} | "
                     f"{r['train_seconds']:.1f} | {r['recon_iters'] or '-'} | "
                     f"{'/'.join(map(str, r['full_iters'])) if r['full_iters'] else '-'} | "
                     f"{r['extrapolated_seconds']:.0f} |")
    data = dict(command=command, model=args.model, w_bits=args.w_bits, a_bits=args.a_bits, device=args.device,
                runs=rows)
    md = write_benchmark_record(args.out, data, f"# PTQ wall time: {args.model} W{args.w_bits}A{args.a_bits} on {args.device}\n\nCommand: `{command}`\n\n"
          "Random-init weights and random calibration images. Reconstruction recipes ran the number of iterations "
          "per unit and stage given below; 'extrapolated' scales their training time linearly to the published "
          "count (capture and the other steps as measured).\n\n" + "\n".join(lines))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
