"""The QAT peer table: qvit's recipes beside their authors' own code, same model, data, budget and oscillation measure.

    python benchmarks/peers/report.py      # reads the two run files below, writes benchmarks/results/qat_peers.{md,json}

qvit's runs come from ``benchmarks/results/qat_table_long.partial.jsonl`` (``benchmarks/qat_table.py``, W2A2, 8 epochs
at batch 32 on 10,000 training images, top-1 on 2,000 test images), the authors' from
``benchmarks/results/qat_peers.partial.jsonl`` (``benchmarks/peers/nagel.py`` and ``benchmarks/peers/ofq.py``, the same
budget). Oscillation is measured the same way on both sides: qvit's per-weight tracker state (EMA momentum 0.001 of
integer-code reversals, one update per optimizer step) on the integer codes of each side's own weight quantizers.
A difference in top-1 counts as within the seed spread when the means differ by no more than the larger of the two
sides' ranges over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import qvit
from qvit.models import reference_weights_id
from qvit.report import load_run_history, write_benchmark_record

RESULTS = Path(__file__).resolve().parents[1] / "results"
#: (qvit recipe, [(key prefix of the authors' runs, what the authors' side is)]); plain lsq has no peer, it is the
#: baseline
PAIRS = (
    ("lsq", []),
    ("ofq", [("ofq_peer", "OFQ's code: StatsQ, QKR, CGA"),
             ("ofq_peer_pretrained_proj", "OFQ's code, the attention projection kept from the float model "
                                          "(`--proj-init pretrained`)")]),
) + tuple(
    (f"nagel_{m}", [(f"nagel_peer_{m}", f"Nagel et al.'s code, {what}, installed torch's clamp gradient"),
                    (f"nagel_peer_inclusive_{m}", f"Nagel et al.'s code, {what}, clamp gradient of torch <= 2.12")]
     + extra)
    for m, what, extra in (
        ("lsq", "LSQ baseline", []), ("dampen", "dampening", []),
        ("freeze", "iterative freezing",
         [("nagel_peer_inclusive_lsq_wd5e-05", "Nagel et al.'s code, LSQ baseline with the freezing runs' weight "
                                               "decay (`--weight-decay 5e-5`), clamp gradient of torch <= 2.12")])))
#: earlier qvit recipe versions shown beside the current one, with what set them apart
EARLIER_VERSIONS = {
    ("nagel_lsq", 1): "calibrated on the float network",
    ("nagel_dampen", 1): "calibrated on the float network",
    ("nagel_dampen", 2): "the reference's initialisation, qvit's per-step cosine for weights and step sizes",
    ("nagel_freeze", 2): "calibrated on the float network",
    ("ofq", 2): "min-max activation ranges calibrated on the float network",
    ("ofq", 3): "query-key reparameterization applied after calibration: the W_qk·x^T step set on the first "
                "training batch",
}
#: (record field, column label, decimals of the percentage)
MEASURES = (("osc_fraction", "osc. f > 0.005, end (%)", 3), ("repeat_reversal_fraction", ">= 4 reversals (%)", 2),
            ("window_reversed_fraction", "reversed in steps 2400-2496 (%)", 3))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qvit-runs", type=Path, default=RESULTS / "qat_table_long.partial.jsonl")
    p.add_argument("--peer-runs", type=Path, default=RESULTS / "qat_peers.partial.jsonl")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--recipe-seeds", nargs="+", default=[], metavar="RECIPE=S,S,...",
                   help="more seeds for one recipe's row and its authors' rows, e.g. nagel_freeze=0,1,2,3")
    p.add_argument("--out", type=Path, default=RESULTS / "qat_peers", help="output path without suffix")
    return p.parse_args(argv)


def budget_settings() -> Dict[str, Any]:
    """The settings both run files record: those of ``qat_table.py --epochs 8 --batch-size 32 --train-images 10000
    --eval-images 2000`` (its ``bn_epochs`` default included)."""
    return dict(weights=reference_weights_id(), epochs=8.0, train_images=10000, eval_images=2000, bn_epochs=1.0,
                batch_size=32)


def seed_records(history: List[Dict[str, Any]], prefix: str, seeds: Sequence[int],
                 version: Optional[int] = None) -> List[Dict[str, Any]]:
    """The newest run ``<prefix>/W2A2/seed<s>`` of each seed (for qvit, of the recipe version ``version``)."""
    newest = {rec["key"]: rec for rec in history
              if version is None or rec.get("recipe_version", 1) == version}
    return [newest[f"{prefix}/W2A2/seed{s}"] for s in seeds if f"{prefix}/W2A2/seed{s}" in newest]


def cell(recs: List[Dict[str, Any]], field: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean (v0 / v1)`` of ``field`` over the seeds that have it; ``-`` where none has."""
    values = [r[field] * scale for r in recs if r.get(field) is not None]
    if not values:
        return "-"
    text = f"{statistics.mean(values):.{digits}f}"
    return text + (f" ({' / '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else "")


def verdict(ours: List[Dict[str, Any]], theirs: List[Dict[str, Any]]) -> str:
    """How the top-1 means compare, against the larger of the two seed ranges."""
    if not ours or not theirs:
        return "not run yet"
    a, b = [r["top1"] for r in ours], [r["top1"] for r in theirs]
    diff = statistics.mean(a) - statistics.mean(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    if len(a) < 2 or len(b) < 2:
        return f"{diff:+.2f} (one seed only)"
    if abs(diff) <= spread:
        return f"{diff:+.2f}: within the seed spread ({spread:.2f})"
    return f"{diff:+.2f}: {'above' if diff > 0 else 'below'} the seed spread ({spread:.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe_seeds = {name: [int(v) for v in seeds.split(",")]
                        for name, seeds in (item.split("=", 1) for item in args.recipe_seeds)}
    except ValueError:
        raise SystemExit(f"--recipe-seeds takes RECIPE=S,S,... entries, got {args.recipe_seeds}") from None
    settings = budget_settings()
    ours_all, theirs_all = load_run_history(args.qvit_runs, settings), load_run_history(args.peer_runs, settings)
    header = ["method", "code", "top-1 (%)", "qvit - authors (top-1)"] + [label for _, label, _ in MEASURES] + ["s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for recipe, peers in PAIRS:
        version = qvit.load_recipe(recipe).version
        seeds = recipe_seeds.get(recipe, args.seeds)
        ours = seed_records(ours_all, recipe, seeds, version)
        sides = [("qvit", ours, f"qvit `{recipe}` v{version}", "")]
        authors = {}
        for prefix, who in peers:
            theirs = seed_records(theirs_all, prefix, seeds)
            if theirs or prefix == peers[0][0]:   # the first peer shows even before its runs
                authors[prefix] = dict(runs=theirs, verdict=verdict(ours, theirs))
                sides.append(("authors", theirs, who, authors[prefix]["verdict"]))
        earlier = {}
        for (name, old), what in EARLIER_VERSIONS.items():
            recs = seed_records(ours_all, recipe, seeds, old) if name == recipe else []
            if recs:
                earlier[old] = recs
                sides.append(("earlier", recs, f"qvit `{recipe}` v{old} ({what})", ""))
        for side, recs, label, vs in sides:
            cells = [recipe if side == "qvit" else "", label, cell(recs, "top1"), vs]
            cells += [cell(recs, field, 100.0, digits) for field, _, digits in MEASURES]
            cells.append(cell(recs, "seconds", 1.0, 0))
            lines.append("| " + " | ".join(cells) + " |")
        rows.append(dict(recipe=recipe, seeds=seeds, qvit=ours, authors=authors,
                         earlier={str(k): recs for k, recs in earlier.items()}))
    init_md = ""
    init_path = args.out.parent / "qat_peers_init.md"
    if init_path.exists():      # benchmarks/peers/nagel.py --init: the initialisations before training
        table = [line for line in init_path.read_text().splitlines() if line.startswith("|")]
        init_md = ("\n## Initialisation (`python benchmarks/peers/nagel.py --checkout PATH --init`)\n\n"
                   "Top-1 before the first training step, and how qvit's step sizes compare with Nagel et al.'s "
                   "(`benchmarks/results/qat_peers_init.md`):\n\n" + "\n".join(table) + "\n")
    command = "python benchmarks/peers/report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"# QAT beside the authors' code: {qvit.REFERENCE_MODEL} on Fashion-MNIST, W2A2\n\n"
          f"Command: `{command.strip()}` (the runs: `python benchmarks/qat_table.py --recipes lsq nagel_lsq "
          "nagel_dampen nagel_freeze ofq --bits 2 --seeds 0 1 --train-images 10000 --epochs 8 --batch-size 32 "
          "--eval-images 2000 --threads 2 --parts vit --out benchmarks/results/qat_table_long`, "
          "`python benchmarks/peers/nagel.py --checkout PATH [--clamp-grad inclusive]`, "
          "`python benchmarks/peers/ofq.py --checkout PATH [--proj-init pretrained]`)\n\n"
          "2496 optimizer steps (8 epochs of 10,000 images at batch 32) for every run, seeds "
          f"{', '.join(map(str, args.seeds))}"
          + "".join(f" ({name}: seeds {', '.join(map(str, s))})" for name, s in recipe_seeds.items())
          + "; values are means with the seeds' values in brackets. Oscillation is "
          "qvit's tracker on each side's own integer codes, per optimizer step: the fraction of tracked weights whose "
          "reversal frequency (EMA, momentum 0.001) ends above 0.005, that reversed at least 4 times in the run, and "
          "that reversed at least once in the last 96 steps. For `ofq` both sides track the values OFQ rounds: fc1, fc2, "
          "proj, the value rows of qkv and each head's product W_q^T W_k (1,916,928 values); the other recipes "
          "track all of qkv.\n\n" + "\n".join(lines) + "\n" + init_md)
    write_benchmark_record(args.out, dict(command=command.strip(), settings=settings, seeds=args.seeds, pairs=rows),
                           md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
