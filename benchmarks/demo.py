"""Run ``qvit demo`` (every PTQ recipe at W8A8/W4A4/W3A3 on the reference model) and record the table.

    python benchmarks/demo.py            # writes benchmarks/results/demo.{md,json}

Not a test: it takes minutes. The record names the command, date, machine and versions.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from qvit.report import environment_info, environment_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "demo.json"
    cmd = ["qvit", "demo", "--output", str(out_json)] + sys.argv[1:]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "qvit"] + cmd[1:], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    table = proc.stdout.strip()
    data = json.loads(out_json.read_text())
    data.update(command=" ".join(cmd[:1] + sys.argv[1:]) or "qvit demo", wall_seconds=wall,
                environment=environment_info())
    out_json.write_text(json.dumps(data, indent=2) + "\n")
    md = (f"# qvit demo\n\nCommand: `{' '.join(['qvit', 'demo'] + sys.argv[1:])}` "
          f"(wall time {wall:.0f} s, including model loading and data preparation)\n\n"
          f"{table}\n\n## Environment\n\n{environment_markdown(data['environment'])}\n")
    (RESULTS / "demo.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
