"""Deployment benchmark: onnxruntime speed of the W8A8 QDQ export against FP32, its accuracy, and packed file sizes.

    python benchmarks/deploy.py                               # reference model and deit_small_patch16_224
    python benchmarks/deploy.py --models qvit_vit_tiny_fmnist --eval-images 2000 --iters 5

For each model: the FP32 ONNX export and the W8A8 ``minmax`` export (QuantizeLinear/DequantizeLinear, int8 weights)
run in onnxruntime with all graph optimizations on ``--ort-threads`` threads; batches of 1 and 32 alternate between
the two sessions ``--rounds`` times and the medians give latency (ms per batch) and throughput (images/s). On the
reference model the W8A8 export's top-1 on the Fashion-MNIST test set is compared with the fake-quant model's.
File sizes: FP32 safetensors against packed checkpoints with every linear/conv weight at W8/W4/W3/W2 (``all``), and
with the default configuration that keeps the patch embedding and the classifier at 8 bits (``default``).
deit_small has random weights (speed and size do not depend on them). Writes ``benchmarks/results/deploy.{md,json}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "qvit_vit_tiny_fmnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[REFERENCE, "deit_small_patch16_224"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--iters", type=int, default=10, help="timed runs per batch size, session and round")
    p.add_argument("--rounds", type=int, default=3, help="FP32/W8A8 alternations")
    p.add_argument("--ort-threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--eval-images", type=int, default=10000, help="test images for the reference model's top-1")
    p.add_argument("--size-bits", nargs="+", type=int, default=[8, 4, 3, 2])
    p.add_argument("--out", type=Path, default=RESULTS / "deploy")
    return p.parse_args(argv)


def _session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(session, x, iters: int) -> float:
    """Median seconds of one ``session.run`` on ``x``."""
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _calibration(model_name: str, model, n: int) -> torch.Tensor:
    if model_name == REFERENCE:
        from qvit.data import FashionMNIST
        return FashionMNIST("train").tensors()[0][:n]
    size = model.pretrained_cfg["input_size"]
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(0))


def _sizes(model_name: str, fp, calib: torch.Tensor, bits_list: List[int], work: Path) -> Dict[str, Any]:
    import qvit
    from safetensors.torch import save_file
    from qvit.export import save_quantized
    fp_path = work / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(fp_path))
    out: Dict[str, Any] = {"fp32_bytes": fp_path.stat().st_size}
    for bits in bits_list:
        for config in ("all", "default"):
            overrides = ({"roles": {"stem.weight": {"bits": None}, "head.weight": {"bits": None}}}
                         if config == "all" else None)
            q = qvit.quantize_ptq(fp, "minmax", calib, w_bits=bits, a_bits=8, overrides=overrides, progress=False)
            path = save_quantized(q, work / f"w{bits}_{config}.safetensors")
            out[f"w{bits}_{config}_bytes"] = path.stat().st_size
            out[f"w{bits}_{config}_parts"] = _file_parts(path)
    return out


def _file_parts(path: Path) -> Dict[str, int]:
    """Bytes of a packed checkpoint by kind: bit-packed codes, float tensors kept as they are, header."""
    import json
    import struct
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    parts = {"packed_codes": 0, "float_tensors": 0, "header": 8 + header_len}
    for key, info in header.items():
        if key != "__metadata__":
            start, end = info["data_offsets"]
            parts["packed_codes" if key.endswith(".packed") else "float_tensors"] += end - start
    return parts


def _evaluate_ort(session, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    correct = 0
    name = session.get_inputs()[0].name
    for i in range(0, len(x), batch):
        logits = session.run(None, {name: x[i:i + batch].numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def run_model(name: str, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    import qvit
    from qvit.export.onnx_export import export_onnx
    from qvit.evaluate import evaluate
    torch.manual_seed(0)
    fp = qvit.build_model(name).eval()
    calib = _calibration(name, fp, 32)
    res: Dict[str, Any] = {"model": name}
    print(f"[{name}] packed checkpoint sizes", file=sys.stderr)
    res["sizes"] = _sizes(name, fp, calib, args.size_bits, work)
    q = qvit.quantize_ptq(fp, "minmax", calib, w_bits=8, a_bits=8, progress=False).eval()
    example = calib[:2]
    fp_path = export_onnx(fp, work / f"{name}_fp32.onnx", example)
    q_path = export_onnx(q, work / f"{name}_w8a8.onnx", example)
    res["onnx_bytes"] = {"fp32": fp_path.stat().st_size, "w8a8": q_path.stat().st_size}
    sessions = {"fp32": _session(fp_path, args.ort_threads), "w8a8": _session(q_path, args.ort_threads)}
    res["latency_ms"] = {}
    for bs in args.batch_sizes:
        x = _calibration(name, fp, bs) if name != REFERENCE else calib[:1].repeat(bs, 1, 1, 1)
        x = x.numpy()
        times: Dict[str, List[float]] = {"fp32": [], "w8a8": []}
        for r in range(args.rounds):
            for kind in (("fp32", "w8a8") if r % 2 == 0 else ("w8a8", "fp32")):
                times[kind].append(_time(sessions[kind], x, args.iters))
        med = {k: statistics.median(v) for k, v in times.items()}
        res["latency_ms"][bs] = {k: 1000 * v for k, v in med.items()}
        print(f"[{name}] batch {bs}: fp32 {1000 * med['fp32']:.1f} ms, w8a8 {1000 * med['w8a8']:.1f} ms, "
              f"speed-up {med['fp32'] / med['w8a8']:.2f}x", file=sys.stderr)
    if name == REFERENCE:
        from qvit.data import FashionMNIST
        from torch.utils.data import DataLoader, TensorDataset
        xt, yt = FashionMNIST("test").tensors()
        if args.eval_images < len(xt):
            idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:args.eval_images]
            xt, yt = xt[idx], yt[idx]
        loader = DataLoader(TensorDataset(xt, yt), batch_size=250)
        res["top1"] = {"fp32_torch": evaluate(fp, loader, progress=False).top1,
                       "w8a8_fake_quant": evaluate(q, loader, progress=False).top1,
                       "w8a8_onnxruntime": _evaluate_ort(sessions["w8a8"], xt, yt),
                       "fp32_onnxruntime": _evaluate_ort(sessions["fp32"], xt, yt), "images": len(xt)}
    return res


def to_markdown(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Deployment: onnxruntime W8A8 vs FP32, packed checkpoint sizes", "",
             f"Command: `python benchmarks/deploy.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "## onnxruntime latency (median ms per batch; all graph optimizations)", "",
             "| model | batch | FP32 ms | W8A8 ms | speed-up | FP32 img/s | W8A8 img/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for bs, t in r["latency_ms"].items():
            lines.append(f"| {r['model']} | {bs} | {t['fp32']:.2f} | {t['w8a8']:.2f} | {t['fp32'] / t['w8a8']:.2f}x | "
                         f"{1000 * int(bs) / t['fp32']:.0f} | {1000 * int(bs) / t['w8a8']:.0f} |")
    for r in results:
        if "top1" in r:
            t = r["top1"]
            lines += ["", f"## Accuracy of the exported reference model ({t['images']} test images)", "",
                      "| | top-1 (%) |", "|---|---|",
                      f"| FP32 PyTorch | {t['fp32_torch']:.2f} |", f"| FP32 onnxruntime | {t['fp32_onnxruntime']:.2f} |",
                      f"| W8A8 fake-quant PyTorch | {t['w8a8_fake_quant']:.2f} |",
                      f"| W8A8 onnxruntime (integer kernels) | {t['w8a8_onnxruntime']:.2f} |",
                      "", f"Difference W8A8 onnxruntime - fake-quant: {t['w8a8_onnxruntime'] - t['w8a8_fake_quant']:+.2f} pt"]
    lines += ["", "## Packed checkpoint size (fraction of the FP32 safetensors file)", "",
              "`all`: every linear/conv weight at the bit-width; `default`: patch embedding and classifier at 8 bits.",
              "", "| model | FP32 MB | " + " | ".join(f"W{b} all | W{b} default" for b in args.size_bits) + " |",
              "|---|---|" + "---|---|" * len(args.size_bits)]
    for r in results:
        s = r["sizes"]
        fp = s["fp32_bytes"]
        cells = []
        for b in args.size_bits:
            for c in ("all", "default"):
                n = s[f"w{b}_{c}_bytes"]
                cells.append(f"{n / 1e6:.2f} MB (1/{fp / n:.1f})")
        lines.append(f"| {r['model']} | {fp / 1e6:.2f} | " + " | ".join(cells) + " |")
    low = min(args.size_bits)
    lines += ["", f"What a W{low} `all` file holds: the float tensors (biases, norms, position embedding, class token, "
              "per-channel scales) are stored exactly, so that the loaded model reproduces the fake-quantized one bit "
              "for bit. Their share of the FP32 file does not shrink with the bit-width.", "",
              "| model | codes | float tensors | header | codes / FP32 file | float tensors + header / FP32 file | ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        s, fp = r["sizes"], r["sizes"]["fp32_bytes"]
        parts, total = s[f"w{low}_all_parts"], s[f"w{low}_all_bytes"]
        rest = parts["float_tensors"] + parts["header"]
        lines.append(f"| {r['model']} | {parts['packed_codes'] / 1e6:.3f} MB | {parts['float_tensors'] / 1e6:.3f} MB | "
                     f"{parts['header'] / 1e6:.3f} MB | {100 * parts['packed_codes'] / fp:.2f}% | {100 * rest / fp:.2f}% | "
                     f"1/{fp / total:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qvit.report.environment import write_benchmark_record
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(run_model(name, args, Path(tmp)))
    md = write_benchmark_record(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                to_markdown(results, args))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
