"""Where a result was measured: machine, software versions and date, for benchmark records."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> Dict[str, Any]:
    """Date (UTC), CPU, core count, torch threads, GPU (if any) and the versions of the main packages."""
    import timm
    import torch

    import qvit

    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "qvit": qvit.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def environment_markdown(info: Dict[str, Any]) -> str:
    """The environment as a markdown bullet list."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def write_benchmark_record(out: Path, data: Dict[str, Any], markdown: str) -> str:
    """Write a benchmark result as ``out.json`` (``data`` plus ``environment``) and ``out.md`` (``markdown`` plus an
    Environment section); ``out`` has no suffix. Returns the markdown written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment_info()
    out.with_suffix(".json").write_text(json.dumps({**data, "environment": env}, indent=2) + "\n")
    md = f"{markdown.rstrip()}\n\n## Environment\n\n{environment_markdown(env)}\n"
    out.with_suffix(".md").write_text(md)
    return md
