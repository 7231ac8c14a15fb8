"""Cost of fake quantization in training: step time and peak memory of W4A4 QAT relative to float training.

    python benchmarks/qat_speed.py                         # deit_small_patch16_224, batch 16, 224 px, lsq recipe
    python benchmarks/qat_speed.py --model test_vit --steps 5 --repeats 1
    python benchmarks/qat_speed.py --repeats 3 --with-unfused-fp   # also float training without fused attention
    python benchmarks/qat_speed.py --repeats 5 --with-linear-only  # also QAT of the linear layers alone
    python benchmarks/qat_speed.py --repeats 3 --live-peak         # also the peak without allocator pooling

Each configuration trains in a fresh subprocess (peak resident memory is per process), float and quantized
alternating ``--repeats`` times so both see the same machine state; the ratios use the medians. Quantized attention
(q, k, v and softmax output quantized) computes ``softmax(q̂ k̂ᵀ) v̂`` explicitly, while float training uses
PyTorch's fused attention kernel; ``--with-unfused-fp`` adds float training with timm's explicit attention
(``timm.layers.set_fused_attn(False)``), to separate that cost from the cost of fake quantization.
``--with-linear-only`` adds QAT with the same recipe but the attention sites (q, k, v, softmax output) in float, so
that attention keeps the fused kernel: what a wrapper that quantizes only ``nn.Linear`` layers measures. Step time
excludes the first ``--warmup`` steps. The peak resident set depends on how the C allocator pools freed blocks:
glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its heaps, where they fragment.
``--live-peak`` repeats each configuration for a few steps with ``MALLOC_MMAP_THRESHOLD_=1048576``, so that every
block of 1 MiB or more is returned to the system when freed: that peak is close to the bytes actually live (those
runs are slower and not timed). Writes ``benchmarks/results/qat_speed.{md,json}``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

RESULTS = Path(__file__).resolve().parent / "results"
#: the attention sites left in float by ``--with-linear-only``
LINEAR_ONLY_OFF = ("attn.q", "attn.k", "attn.v", "attn.probs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--recipe", default="lsq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--with-unfused-fp", action="store_true",
                   help="also time float training with explicit (unfused) attention, as quantized attention runs")
    p.add_argument("--with-linear-only", action="store_true",
                   help="also time QAT with the attention sites (q, k, v, softmax output) in float")
    p.add_argument("--live-peak", action="store_true",
                   help="also measure each peak with glibc returning every block of 1 MiB or more when freed")
    p.add_argument("--worker", choices=("fp", "fp_unfused", "qat", "qat_linear"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "qat_speed")
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    """One training run in this process: AdamW steps on random data; step times and peak RSS growth."""
    import timm
    import torch
    import torch.nn.functional as F

    import qvit
    from qvit.quantizers import quantizer_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "fp_unfused":
        timm.layers.set_fused_attn(False)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    if args.worker in ("qat", "qat_linear"):
        recipe = qvit.load_recipe(args.recipe)
        patch = {"roles": {r: {"enabled": False} for r in LINEAR_ONLY_OFF}} if args.worker == "qat_linear" else None
        model = qvit.prepare(model, recipe.quant_config(args.bits, args.bits, patch))
        qvit.calibrate(model, x, progress=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_peak_reset = _reset_peak_rss()     # so calibration's peak is not counted as training's
    times: List[float] = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_peak = _peak_rss_kb() if train_peak_reset else peak
    return {"kind": args.worker, "step_seconds": statistics.median(times), "peak_rss_mb": train_peak / 1024,
            "process_peak_rss_mb": peak / 1024,
            "peak_growth_mb": (peak - base) / 1024, "saved_mb": _saved_for_backward(model, x, y) / 2 ** 20,
            "quantizer_params": len(quantizer_parameters(model.modules())) if args.worker != "fp" else 0}


_COLUMNS = (("step_seconds", "{:.3f}"), ("peak_rss_mb", "{:.0f}"), ("saved_mb", "{:.0f}"), ("process_peak_rss_mb", "{:.0f}"))
_LIVE_COLUMN = ("live_peak_mb", "{:.0f}")
#: glibc setting of the ``--live-peak`` runs: blocks of 1 MiB or more are mmapped and unmapped when freed
LIVE_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _columns(m: Dict[str, float]):
    return _COLUMNS + ((_LIVE_COLUMN,) if _LIVE_COLUMN[0] in m else ())


def _cells(m: Dict[str, float]) -> str:
    """One configuration's medians as table cells: step (s), peak RSS in training, saved for backward, process peak
    (MB) and, when measured, the peak without allocator pooling (MB)."""
    return " | ".join(fmt.format(m[k]) for k, fmt in _columns(m))


def _ratio_cells(a: Dict[str, float], b: Dict[str, float]) -> str:
    """The ratios ``a / b`` of every column of :func:`_cells`."""
    return " | ".join(f"{a[k] / b[k]:.2f}x" for k, _ in _columns(a))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_kb() is not None
    except OSError:
        return False


def _peak_rss_kb():
    """The peak resident set (``VmHWM``, KiB) since the process started or its last reset; None if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _saved_for_backward(model, x, y) -> int:
    """Bytes of the tensors autograd keeps from one forward pass for the backward pass (each storage once;
    parameters excluded): the activation memory of a training step, independent of the allocator."""
    import torch
    import torch.nn.functional as F
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    runs: List[Dict[str, Any]] = []
    base_cmd = [sys.executable, __file__, "--model", args.model, "--recipe", args.recipe, "--bits", str(args.bits),
                "--batch-size", str(args.batch_size), "--img-size", str(args.img_size), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--threads", str(args.threads)]
    kinds = ("fp",) + (("fp_unfused",) if args.with_unfused_fp else ()) + ("qat",) + \
        (("qat_linear",) if args.with_linear_only else ())
    for r in range(args.repeats):
        for kind in kinds:
            out = subprocess.run(base_cmd + ["--worker", kind], capture_output=True, text=True)
            if out.returncode:
                sys.stderr.write(out.stderr)
                return out.returncode
            runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "repeat": r})
            if args.live_peak:
                live_cmd = base_cmd + ["--worker", kind]
                live_cmd[live_cmd.index("--steps") + 1] = "3"
                live = subprocess.run(live_cmd, capture_output=True, text=True, env={**os.environ, **LIVE_PEAK_ENV})
                if live.returncode:
                    sys.stderr.write(live.stderr)
                    return live.returncode
                runs[-1]["live_peak_mb"] = json.loads(live.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"repeat {r} {kind}: {runs[-1]['step_seconds']:.3f} s/step, peak RSS {runs[-1]['peak_rss_mb']:.0f} MB"
                  + (f", without pooling {runs[-1]['live_peak_mb']:.0f} MB" if args.live_peak else ""), flush=True)
    metrics = ("step_seconds", "peak_rss_mb", "process_peak_rss_mb", "saved_mb") + (("live_peak_mb",) if args.live_peak else ())
    med = {k: {m: statistics.median(r[m] for r in runs if r["kind"] == k) for m in metrics} for k in kinds}
    time_ratio = med["qat"]["step_seconds"] / med["fp"]["step_seconds"]
    mem_ratio = med["qat"]["peak_rss_mb"] / med["fp"]["peak_rss_mb"]
    saved_ratio = med["qat"]["saved_mb"] / med["fp"]["saved_mb"]
    process_ratio = med["qat"]["process_peak_rss_mb"] / med["fp"]["process_peak_rss_mb"]
    live_ratio = med["qat"]["live_peak_mb"] / med["fp"]["live_peak_mb"] if args.live_peak else None
    from qvit.report import write_benchmark_record
    command = ("python benchmarks/qat_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    data = dict(command=command, model=args.model, recipe=args.recipe, bits=args.bits, batch_size=args.batch_size,
                img_size=args.img_size, runs=runs, median=med, time_ratio=time_ratio, memory_ratio=mem_ratio,
                saved_ratio=saved_ratio, process_memory_ratio=process_ratio, live_memory_ratio=live_ratio,
                live_peak_env=LIVE_PEAK_ENV if args.live_peak else None)
    rows = [f"| FP32 | {_cells(med['fp'])} |", f"| W{args.bits}A{args.bits} {args.recipe} | {_cells(med['qat'])} |",
            f"| ratio | {_ratio_cells(med['qat'], med['fp'])} |"]
    if args.with_unfused_fp:
        u = med["fp_unfused"]
        data["time_ratio_to_unfused_fp"] = med["qat"]["step_seconds"] / u["step_seconds"]
        data["memory_ratio_to_unfused_fp"] = med["qat"]["peak_rss_mb"] / u["peak_rss_mb"]
        rows += [f"| FP32, unfused attention | {_cells(u)} |", f"| ratio to unfused FP32 | {_ratio_cells(med['qat'], u)} |"]
    if args.with_linear_only:
        lin = med["qat_linear"]
        data["time_ratio_linear_only"] = lin["step_seconds"] / med["fp"]["step_seconds"]
        data["memory_ratio_linear_only"] = lin["peak_rss_mb"] / med["fp"]["peak_rss_mb"]
        rows += [f"| W{args.bits}A{args.bits} {args.recipe}, linear layers only | {_cells(lin)} |",
                 f"| ratio, linear layers only | {_ratio_cells(lin, med['fp'])} |"]
    md = write_benchmark_record(args.out, data, f"# QAT cost: {args.model}, W{args.bits}A{args.bits} `{args.recipe}` vs float training\n\n"
          f"Command: `{command}`\n\nBatch {args.batch_size}, {args.img_size} px, AdamW, median of {args.repeats} "
          f"alternating runs of {args.steps} timed steps (after {args.warmup}); peak memory is the process's peak "
          "resident set during training (reset after model building and calibration); saved for backward is what autograd keeps of one forward pass (activations, each storage "
          "once, parameters excluded), which does not depend on how the C allocator reuses freed pages; the process "
          "peak includes building the model and calibrating the quantizers."
          + (" Without pooling: the peak resident set in training of separate 3-step runs with "
             "`MALLOC_MMAP_THRESHOLD_=1048576`, where glibc returns every freed block of 1 MiB or more to the system "
             "instead of keeping it in a heap where it can fragment: close to the bytes actually live."
             if args.live_peak else "") + "\n\n"
          "| | step (s) | peak RSS in training (MB) | saved for backward (MB) | process peak RSS (MB) |"
          + (" peak RSS without pooling (MB) |\n|---|---|---|---|---|---|\n" if args.live_peak else "\n|---|---|---|---|---|\n")
          + "\n".join(rows) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
