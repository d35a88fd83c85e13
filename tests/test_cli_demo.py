"""`mixprec demo`: the embedded experiments are well formed, and a shortened demo writes its report."""

from __future__ import annotations

import json

import mixprec as mp
from mixprec.cli import main
from mixprec.cli.demo import DEMO
from mixprec.recipes import RECIPES


def test_embedded_demo_shows_parity_and_both_failure_modes():
    by_recipe = {d.recipe: d for d in DEMO}
    assert set(by_recipe) == {"digits", "underflow", "tiny-updates"} and set(by_recipe) <= set(RECIPES)
    assert by_recipe["digits"].expect == {"f16-master": "matches"} and by_recipe["digits"].seeds == 3
    assert by_recipe["underflow"].expect["f16-master-noscale"] == "stalled"
    assert by_recipe["tiny-updates"].expect["f16-pure"] == "stalled"
    for demo in DEMO:
        assert "f32" in demo.policies and set(demo.expect) <= set(demo.policies)
        for policy in demo.policies:
            mp.Policy.parse(policy)


def test_shortened_demo_writes_the_report_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fraction", "0.02", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in text and "shortened run" in text
    assert "What this shows" in text
    results = json.loads((out / "results.json").read_text())
    assert [e["recipe"] for e in results["experiments"]] == [d.recipe for d in DEMO]
    assert results["demo"]["fraction"] == 0.02
    report = (out / "report.md").read_text()
    for demo in DEMO:
        assert f"## {demo.recipe}" in report and (out / f"{demo.recipe}-curves.png").is_file()


def test_bad_fraction_is_rejected(capsys):
    assert main(["demo", "--fraction", "0"]) == 2
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err
