"""``qvit recipes``: the shipped recipes, one line each."""
from __future__ import annotations

import argparse

from ..recipes import list_recipes, load_recipe
from ._common import COMMANDS, Command


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit recipes``."""
    return subparsers.add_parser("recipes", help="list the shipped recipes")


def run(args: argparse.Namespace) -> int:
    """Print each recipe's name, kind, version and description."""
    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:14s} {r.pipeline}  v{r.version}  {r.description}")
    return 0


COMMANDS.add("recipes", Command(add_parser, run))
