"""``qvit eval``: top-1/top-5 of a float model."""
from __future__ import annotations

import argparse

from ..evaluate import evaluate
from ._common import COMMANDS, Command, _add_model_args, _Session


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit eval``."""
    p = subparsers.add_parser("eval", help="evaluate a float model")
    _add_model_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Evaluate ``--model`` on the evaluation split and print the result."""
    s = _Session(args)
    res = evaluate(s.model, s.loader(s.eval_set()), progress=s.progress, desc=f"eval {args.model}")
    print(f"{args.model} FP32: {res}")
    return 0


COMMANDS.add("eval", Command(add_parser, run))
