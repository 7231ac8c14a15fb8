import json

import pytest

from qvit.report import append_run, load_run_history, load_runs, settings_tag


def test_runs_are_reused_only_under_the_same_settings(tmp_path, capsys):
    path = tmp_path / "table.partial.jsonl"
    old, new = {"weights": "aaa", "budget": "full"}, {"weights": "bbb", "budget": "full"}
    assert load_runs(path, old) == {}
    stored = append_run(path, {"key": "minmax/W4A4/seed0", "top1": 86.5}, old)
    assert stored["settings"] == old
    append_run(path, {"key": "minmax/W4A4/seed1", "top1": 86.8}, new)
    with open(path, "a") as f:
        f.write('{"key": "cut off')          # a run killed while writing its line
    runs = load_runs(path, old)
    assert list(runs) == ["minmax/W4A4/seed0"] and runs["minmax/W4A4/seed0"]["top1"] == 86.5
    out = capsys.readouterr().out
    assert "unreadable line skipped" in out and "1 run(s) recorded under other settings" in out
    assert list(load_runs(path, new)) == ["minmax/W4A4/seed1"]
    assert json.loads(path.read_text().splitlines()[1])["settings"] == new


def test_a_rerun_key_keeps_its_history_and_the_newest_run_wins(tmp_path):
    path = tmp_path / "table.partial.jsonl"
    settings = {"weights": "aaa"}
    append_run(path, {"key": "nagel_lsq/W2A2/seed0", "recipe_version": 1, "top1": 87.0}, settings)
    append_run(path, {"key": "lsq/W2A2/seed0", "recipe_version": 1, "top1": 81.0}, settings)
    append_run(path, {"key": "nagel_lsq/W2A2/seed0", "recipe_version": 2, "top1": 82.0}, settings)
    assert [(r["key"], r["recipe_version"]) for r in load_run_history(path, settings)] == [
        ("nagel_lsq/W2A2/seed0", 1), ("lsq/W2A2/seed0", 1), ("nagel_lsq/W2A2/seed0", 2)]
    assert load_runs(path, settings)["nagel_lsq/W2A2/seed0"]["top1"] == 82.0


def test_append_run_needs_a_key(tmp_path):
    with pytest.raises(ValueError, match="key"):
        append_run(tmp_path / "x.jsonl", {"top1": 1.0}, {})


def test_settings_tag_is_stable_and_order_free():
    assert settings_tag({"a": 1, "b": [2, 3]}) == settings_tag({"b": [2, 3], "a": 1})
    assert settings_tag({"a": 1}) != settings_tag({"a": 2}) and len(settings_tag({})) == 10
