"""Resumable benchmark tables: every finished run is one JSON line, valid only under the settings that produced it.

A long benchmark appends each run as soon as it finishes; re-running the same command skips those runs. A run is
reused only when its stored ``settings`` (the model weights' id, the budget, the data sizes, ...) equal the current
ones, so changing the reference weights or a budget never mixes old and new numbers in one table.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List


def settings_tag(settings: Dict[str, Any]) -> str:
    """A short stable hash of ``settings`` (JSON with sorted keys), for run-directory names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def load_run_history(path: Path, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every run in the JSON-lines file ``path`` recorded under ``settings``, oldest first (a key rerun later, e.g.
    under a new recipe version, appears once per run); [] if no file.

    Runs recorded under other settings are left in the file but not returned; how many is printed.
    """
    path = Path(path)
    runs: List[Dict[str, Any]] = []
    stale = 0
    if not path.exists():
        return runs
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:   # a run killed while writing its line
            print(f"{path}:{number}: unreadable line skipped")
            continue
        if rec.get("settings") == settings:
            runs.append(rec)
        else:
            stale += 1
    if stale:
        print(f"{path}: {stale} run(s) recorded under other settings are not reused")
    return runs


def load_runs(path: Path, settings: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The newest run of each ``key`` in the JSON-lines file ``path`` recorded under ``settings``; {} if no file.

    Runs recorded under other settings are left in the file but not returned; how many is printed.
    """
    return {rec["key"]: rec for rec in load_run_history(path, settings)}


def append_run(path: Path, record: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Append ``record`` (which must have a ``key``) with ``settings`` to ``path`` and return the stored record."""
    if "key" not in record:
        raise ValueError("a run record needs a 'key'")
    stored = dict(record, settings=settings)
    with open(path, "a") as f:
        f.write(json.dumps(stored) + "\n")
    return stored
