"""The ``qvit`` command line: ``demo``, ``eval``, ``ptq``, ``qat``, ``export``, ``softlabels``, ``report``,
``recipes``, ``describe``; one module per command, each registered in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..data import DatasetMissingError
from ..models.factory import WeightsUnavailableError
from ..quantizers import NotCalibratedError
from ..runtime import get_settings
from ._common import COMMANDS, Command
# imported in the order `qvit --help` lists them
from . import demo, evaluate, ptq, qat, export, softlabels, report, recipes, describe  # noqa: F401

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

_ERRORS = (DatasetMissingError, FileNotFoundError, FileExistsError, KeyError, ValueError, WeightsUnavailableError,
           NotCalibratedError)


def build_parser() -> argparse.ArgumentParser:
    """The ``qvit`` parser, one sub-parser per registered command."""
    p = argparse.ArgumentParser(prog="qvit", description="Low-bit quantization of vision transformers on timm models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.keys():
        COMMANDS.get(name).add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``qvit`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (2 on a usage or input error,
    130 when interrupted). Errors are one line on stderr unless ``get_settings().debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run = COMMANDS.get(args.command).run
    if get_settings().debug:
        return run(args)
    try:
        return run(args)
    except _ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"qvit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qvit {args.command}: interrupted", file=sys.stderr)
        return 130
