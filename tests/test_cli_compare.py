"""`mixprec compare`: policies parsed from one option, a short comparison end to end, bad input."""

from __future__ import annotations

import json

import pytest

from mixprec.cli import main
from mixprec.harness.training import split_policies


def test_split_policies_keeps_key_value_parts_with_their_policy():
    assert split_policies("f32,f16-master") == ["f32", "f16-master"]
    assert split_policies("f32,f16-master,scaling=none,bf16-pure") == ["f32", "f16-master,scaling=none",
                                                                      "bf16-pure"]
    assert split_policies("params=f16,compute=f16;f32") == ["params=f16,compute=f16", "f32"]
    with pytest.raises(ValueError, match="no policies"):
        split_policies(" , ")


def test_short_comparison_prints_80_column_tables_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "--recipe", "tiny-updates", "--policies", "f32,f16-master,f16-pure", "--seeds", "2",
                 "--steps", "5", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines() if not line.startswith(("mixprec compare", "report:"))) <= 80
    assert "f16-pure" in text and "params" in text and f"report: {out / 'report.md'}" in text
    results = json.loads((out / "results.json").read_text())
    assert [row["policy"] for row in results["experiments"][0]["summary"]] == ["f32", "f16-master", "f16-pure"]
    assert (out / "tiny-updates-curves.png").is_file() and (out / "tiny-updates-loss-scale.png").is_file()
    for policy in ("f32", "f16-master", "f16-pure"):
        for seed in (0, 1):
            assert (out / "runs" / "tiny-updates" / policy / f"seed{seed}" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--recipe", "nope"], "unknown recipe 'nope'; valid: digits"),
    (["--recipe", "digits", "--policies", "f32,f16-mastr"], "unknown policy preset 'f16-mastr'; valid presets:"),
    (["--recipe", "digits", "--policies", "f32,f32"], "listed twice"),
    (["--recipe", "digits", "--seeds", "0"], "--seeds must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, capsys):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", "--recipe", "digits", "--out", str(blocker / "x")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
