"""``qvit report RUN_DIR``: tables and plots of a QAT run (metrics, per-layer oscillation over training)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from ..qat.oscillation import FREQ_EDGES


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> Dict[str, Any]:
    """``metrics`` (one row per logged step), ``oscillation`` (per-layer statistics per epoch) and ``result``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} is not a QAT run directory (no metrics.jsonl)")
    result_path = run_dir / "result.json"
    return {"metrics": _read_jsonl(run_dir / "metrics.jsonl"),
            "oscillation": _read_jsonl(run_dir / "oscillation.jsonl"),
            "result": json.loads(result_path.read_text()) if result_path.exists() else {}}


def _pct(x: float) -> str:
    return f"{100 * x:.3f}"


def report_markdown(run: Dict[str, Any]) -> str:
    """Summary, per-epoch oscillation totals and the final per-layer table."""
    lines = ["# QAT run report", ""]
    res = run["result"]
    if res:
        lines += [f"- model: {res.get('model')}, recipe: {res.get('recipe')} (v{res.get('recipe_version')}), "
                  f"W{res.get('w_bits')}A{res.get('a_bits')}",
                  f"- top-1: {res.get('top1', float('nan')):.2f}% (FP32 {res.get('fp_top1', float('nan')):.2f}%), "
                  f"{res.get('steps')} steps in {res.get('seconds', 0):.0f}s", ""]
    osc = run["oscillation"]
    if osc:
        lines += ["## Oscillation over training", "",
                  "| step | oscillating (%) | frozen (%) | mean frequency |", "|---|---|---|---|"]
        for snap in osc:
            n = sum(layer["n"] for layer in snap["layers"])
            o = sum(layer["osc_fraction"] * layer["n"] for layer in snap["layers"]) / n
            fr = sum(layer["frozen_fraction"] * layer["n"] for layer in snap["layers"]) / n
            mf = sum(layer["mean_freq"] * layer["n"] for layer in snap["layers"]) / n
            lines.append(f"| {snap['step']} | {_pct(o)} | {_pct(fr)} | {mf:.2e} |")
        lines += ["", f"## Per layer at step {osc[-1]['step']}", "",
                  "| layer | weights | bits | oscillating (%) | frozen (%) | clipped (%) | reversals (mean) |",
                  "|---|---|---|---|---|---|---|"]
        for layer in osc[-1]["layers"]:
            hist = layer["reversal_hist"]
            mids = [0, 1] + [1.5 * 2 ** i for i in range(1, len(hist) - 1)]
            mean_rev = sum(m * c for m, c in zip(mids, hist)) / max(1, layer["n"])
            lines.append(f"| {layer['site']} | {layer['n']} | {layer['bits']} | {_pct(layer['osc_fraction'])} | "
                         f"{_pct(layer['frozen_fraction'])} | {_pct(layer.get('clipped_fraction', 0.0))} | "
                         f"{mean_rev:.2f} |")
    return "\n".join(lines) + "\n"


def plot_run(run: Dict[str, Any], out_dir: Path) -> List[Path]:
    """``oscillation_per_layer.png`` (fraction over training, one line per layer), ``frequency_histogram.png``
    (final per-weight frequency distribution) and ``loss.png``; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if run["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in run["metrics"]], [r["loss"] for r in run["metrics"]])
        ax.set_xlabel("step"), ax.set_ylabel("task loss"), ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    osc = run["oscillation"]
    if osc:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [s["step"] for s in osc]
        for i, layer in enumerate(osc[-1]["layers"]):
            ax.plot(steps, [100 * s["layers"][i]["osc_fraction"] for s in osc], label=layer["site"], lw=1)
        ax.set_xlabel("step"), ax.set_ylabel("oscillating weights (%)"), ax.grid(alpha=0.3)
        if len(osc[-1]["layers"]) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out_dir / "oscillation_per_layer.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        counts = [sum(layer["freq_hist"][b] for layer in osc[-1]["layers"]) for b in range(len(FREQ_EDGES))]
        labels = [f"<{hi:g}" for hi in FREQ_EDGES[1:]] + [f">={FREQ_EDGES[-1]:g}"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)), labels, rotation=30, fontsize=7)
        ax.set_yscale("log"), ax.set_xlabel("oscillation frequency (EMA of reversals per step)")
        ax.set_ylabel("weights")
        fig.tight_layout()
        written.append(out_dir / "frequency_histogram.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(run_dir: Path, out_dir: Path = None) -> Path:
    """Write ``report.md`` and the plots into ``out_dir`` (default: ``run_dir/report``); returns the markdown path."""
    run = load_run(Path(run_dir))
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_run(run, out_dir)
    md = report_markdown(run) + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    path = out_dir / "report.md"
    path.write_text(md)
    return path
