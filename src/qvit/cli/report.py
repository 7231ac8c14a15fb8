"""``qvit report``: tables and plots of a QAT run directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import COMMANDS, Command


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``qvit report``."""
    p = subparsers.add_parser("report", help="tables and plots of a QAT run directory (oscillation over training)")
    p.add_argument("run_dir", type=Path, help="the --out directory of a `qvit qat` run")
    p.add_argument("--out", type=Path, help="where to write report.md and the plots (default: RUN_DIR/report)")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report of ``run_dir`` and print it."""
    from ..report.qat_report import write_report
    path = write_report(args.run_dir, args.out)
    print(path.read_text())
    print(f"report written to {path}")
    return 0


COMMANDS.add("report", Command(add_parser, run))
