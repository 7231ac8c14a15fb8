"""``qvit softlabels``: multi-crop soft labels of the float model, precomputed for QAT (vvtq)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import COMMANDS, Command, _add_model_args, _Session


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit softlabels``."""
    p = subparsers.add_parser("softlabels", help="precompute multi-crop soft labels of the float model (for vvtq)")
    _add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--crops", type=int, default=16, help="random-resized crops stored per image")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], help="crop area range")
    p.add_argument("--topk", type=int, help="keep the k largest probabilities per crop (FKD's marginal smoothing)")
    p.add_argument("--train-images", type=int, help="a seeded subset of the training set (must match qat's)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the float model on ``--crops`` random crops of each training image and save the probabilities."""
    from ..qat.multicrop import save_soft_labels
    s = _Session(args)
    train_set = s.train_set(args.train_images)
    path = save_soft_labels(s.model, train_set, args.out, crops=args.crops, scale=tuple(args.crop_scale),
                            topk=args.topk, seed=s.seed, batch_size=args.batch_size, progress=s.progress)
    print(f"soft labels of {len(train_set)} images x {args.crops} crops written to {path}")
    return 0


COMMANDS.add("softlabels", Command(add_parser, run))
