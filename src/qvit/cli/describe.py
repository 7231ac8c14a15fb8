"""``qvit describe``: every quantization site a recipe gives a model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..models import REFERENCE_MODEL, build_model, describe, format_sites, prepare
from ..recipes import load_recipe
from ._common import COMMANDS, Command, _overrides


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit describe``."""
    p = subparsers.add_parser("describe", help="list every quantization site a recipe gives a model")
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--recipe", default="minmax")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--config", type=Path)
    return p


def run(args: argparse.Namespace) -> int:
    """Prepare ``--model`` with the recipe's config and print its sites."""
    model = build_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                        num_classes=args.num_classes)
    config = load_recipe(args.recipe).quant_config(args.w_bits, args.a_bits, _overrides(args))
    prepare(model, config)
    print(format_sites(describe(model)))
    return 0


COMMANDS.add("describe", Command(add_parser, run))
