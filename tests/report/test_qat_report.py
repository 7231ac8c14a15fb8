"""QAT run reports from the metrics and oscillation logs."""
import json

import pytest

from qvit.report.qat_report import load_run, report_markdown, write_report


def _layer(site, n, osc, frozen=0.0):
    return {"site": site, "n": n, "bits": 3, "steps": 10, "osc_fraction": osc, "mean_freq": 0.001,
            "frozen_fraction": frozen, "reversed_last_step": 0.0, "flipped_last_step": 0.0,
            "reversal_hist": [n, 0, 0, 0, 0, 0, 0, 0], "freq_hist": [n] + [0] * 7, "clipped_fraction": 0.0}


def test_report_weights_layers_by_size(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    snap = {"step": 10, "layers": [_layer("a.weight", 300, 0.01), _layer("b.weight", 100, 0.05, frozen=0.02)]}
    (tmp_path / "oscillation.jsonl").write_text(json.dumps(snap) + "\n")
    md = report_markdown(load_run(tmp_path))
    assert "| 10 | 2.000 | 0.500 |" in md          # (300*1% + 100*5%) / 400 = 2 %; frozen 100*2% / 400 = 0.5 %
    assert "| b.weight | 100 | 3 | 5.000 | 2.000 |" in md
    path = write_report(tmp_path)
    assert path.exists() and (tmp_path / "report" / "frequency_histogram.png").stat().st_size > 0


def test_report_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a QAT run"):
        load_run(tmp_path)
