"""``qvit export``: a packed checkpoint rewritten, or converted to QDQ ONNX and checked in onnxruntime."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import subset
from ..models import REFERENCE_MODEL, quant_state
from ._common import COMMANDS, PACKED_NAME, Command, _add_model_args, _Session


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit export``."""
    p = subparsers.add_parser("export", help="convert a packed checkpoint (from `qvit ptq --save` or `qvit qat`) to "
                                             "ONNX, checked in onnxruntime, or rewrite it")
    _add_model_args(p)
    p.add_argument("--quantized", type=Path, required=True,
                   help="the packed checkpoint: `qvit ptq --save FILE`, or RUN_DIR/" + PACKED_NAME + " of `qvit qat`")
    p.add_argument("--format", choices=("qvit", "onnx"),
                   help="qvit: packed safetensors checkpoint; onnx: QDQ ONNX (default: from --out's suffix)")
    p.add_argument("--out", type=Path, required=True, help="file to write (.safetensors or .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--unsigned-weights", action="store_true",
                   help="store weight codes as uint8: exact integer arithmetic in onnxruntime on x86 CPUs without "
                        "VNNI (whose fast int8 kernels can saturate), at about float32 speed")
    return p


def run(args: argparse.Namespace) -> int:
    """Load ``--quantized`` and write it to ``--out`` in ``--format``; ONNX output is compared with PyTorch."""
    from ..export import load_quantized, save_quantized
    from ..export.onnx_export import compare_onnx, export_onnx
    s = _Session(args)
    qmodel = load_quantized(args.quantized, s.model if args.checkpoint or args.model != REFERENCE_MODEL else None)
    fmt = args.format or ("onnx" if str(args.out).endswith(".onnx") else "qvit")
    example = next(iter(s.loader(subset(s.eval_set(), 8, s.seed))))[0]
    if fmt == "qvit":
        path = save_quantized(qmodel, args.out, recipe=quant_state(qmodel).packed.get("recipe"))
    else:
        path = export_onnx(qmodel, args.out, example, opset=args.opset, unsigned_weights=args.unsigned_weights)
        diff = compare_onnx(qmodel, path, example)
        fused = compare_onnx(qmodel, path, example, optimize=True)
        print(f"onnxruntime vs PyTorch on {example.shape[0]} images: max |logit difference| {diff:.2e} "
              f"(ONNX semantics), {fused:.2e} (onnxruntime's fused integer kernels)")
    print(f"{args.model} {args.quantized} written to {path} ({fmt}, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


COMMANDS.add("export", Command(add_parser, run))
