"""`mixprec paper`: the families' table, the ablations' verdicts (a diverging one recorded, not fatal), bad input."""

from __future__ import annotations

import json

import pytest

from mixprec.cli import main
from mixprec.cli.paper import FAMILIES, activation_gradient_underflow, chosen_families
from mixprec.recipes import get_recipe


def test_paper_quick_on_one_family_writes_the_table_and_records_a_diverging_ablation(tmp_path, capsys):
    out = tmp_path / "paper"
    assert main(["paper", "--families", "classification", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| classification"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "`digits`" and "(matches)" in cells[4]  # f16-master matches FP32 on digits
    assert cells[7] == "diverged"  # FP16 weights with Adam and no master: eps flushes to zero in FP16
    assert cells[9].endswith("%")
    table = (out / "paper.md").read_text()
    assert row in table and "Figure 3" in table
    results = json.loads((out / "results.json").read_text())
    runs = {r["policy"]: r for e in results["experiments"] for r in e["runs"]}
    stopped = [r for r in runs.values() if r.get("stopped")]
    assert len(stopped) == 1 and "inf" in stopped[0]["stopped"]  # the one diverged run says why
    assert results["paper"]["rows"][0]["family"] == "classification"


def test_the_figure_3_statistic_is_the_doctors_fp16_underflow_share_of_activation_gradients():
    # underflow's activation gradients lie in [2^-27, 2^-24): most flush to zero in FP16 without scaling.
    assert activation_gradient_underflow(get_recipe("underflow")) > 0.5
    assert activation_gradient_underflow(get_recipe("digits")) < 0.01


def test_families_are_checked_before_anything_trains(capsys):
    assert chosen_families("classification, classification") == ["classification"]
    with pytest.raises(ValueError, match="unknown families \\['vision'\\]; valid: " + ", ".join(FAMILIES)):
        chosen_families("vision")
    assert main(["paper", "--families", "vision"]) == 2
    assert "unknown families" in capsys.readouterr().err
