"""`mixprec train`: a short run end to end, resume through the CLI, and bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec.cli import main

MIXPREC = str(Path(sys.executable).parent / "mixprec")


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--recipe", "--policy", "--steps", "--seed", "--out", "--resume", "--stop-at"):
        assert option in out


def test_short_run_writes_logs_tensorboard_checkpoint_and_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-updates", "--policy", "f16-master", "--steps", "6",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "emulated" in text and "finished step 6" in text and str(out) in text
    records = _records(out)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 6]
    assert list(out.glob("events.out.tfevents.*")) and (out / "checkpoint-000006.pt").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["policy"] == "f16-master" and result["execution"] == "emulated"
    assert result["environment"]["torch"] and result["final_loss_scale"] == 65536.0


def test_stop_and_resume_through_the_cli_matches_an_uninterrupted_run(tmp_path, capsys):
    args = ["train", "--recipe", "underflow", "--policy", "f16-master", "--steps", "8", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "part"), "--stop-at", "3"]) == 0
    assert "stopped at step 3" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    whole, part = _records(tmp_path / "whole"), _records(tmp_path / "part")
    assert part == whole  # every logged step once, with identical values
    a = json.loads((tmp_path / "whole" / "result.json").read_text())
    b = json.loads((tmp_path / "part" / "result.json").read_text())
    assert a["final_metric"] == b["final_metric"] and a["history"] == b["history"]


@pytest.mark.parametrize("args, expected", [
    (["--recipe", "mnist", "--policy", "f32"], "unknown recipe 'mnist'; valid: digits, lm, rnn, underflow"),
    (["--recipe", "digits", "--policy", "fp17"], "unknown policy preset 'fp17'; valid presets: f32, f16-mixed"),
    (["--recipe", "digits", "--policy", "f32", "--resume", "--out", "{tmp}/nothing"], "no checkpoint to resume"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--recipe", "digits", "--policy", "f32", "--out", str(blocker / "run")]) == 2
    captured = capsys.readouterr()
    assert "cannot write to output folder" in captured.err and "mixprec train:" not in captured.out


def test_bad_input_through_the_console_script():
    proc = subprocess.run([MIXPREC, "train", "--recipe", "nope", "--policy", "f32"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mixprec train: error: unknown recipe 'nope'; valid: digits, lm, rnn, "
                                   "underflow, tiny-updates, gpt, gpt2-small (or module.path:object for your own)")


MY_TASKS = '''
import mixprec.recipes.tiny_updates as base
import dataclasses
recipe = dataclasses.replace(base.recipe(), name="mine", steps=3, eval_every=3)
'''


@pytest.mark.parametrize("spec", ["my_tasks:recipe", "{tmp}/elsewhere/my_tasks.py:recipe"])
def test_your_own_recipe_from_the_current_directory_or_a_file(tmp_path, spec):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cwd").mkdir()
    for folder in (tmp_path / "cwd", tmp_path / "elsewhere"):
        (folder / "my_tasks.py").write_text(MY_TASKS)
    # module:object from the folder that holds the module; a file path from anywhere else
    run_in = tmp_path / "cwd" if spec.startswith("my_tasks") else tmp_path
    proc = subprocess.run([MIXPREC, "train", "--recipe", spec.format(tmp=tmp_path), "--policy", "f16-master",
                           "--no-progress", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, cwd=run_in)
    assert proc.returncode == 0, proc.stderr
    assert "mixprec train: mine under f16-master" in proc.stdout


def test_a_recipe_file_that_does_not_exist_is_one_clear_line(tmp_path):
    proc = subprocess.run([MIXPREC, "train", "--recipe", f"{tmp_path}/nope.py:recipe", "--policy", "f32"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


# ----- run folders: never overwritten unless asked, and what --resume / --overwrite / --keep-checkpoints do


TINY = ["train", "--recipe", "tiny-updates", "--policy", "f16-master", "--no-progress"]


def test_a_folder_holding_a_run_is_refused_with_exit_2_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "6", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*TINY, "--steps", "6", "--out", str(out)]) == 2  # the same command again
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"mixprec train: error: output folder '{out}' already holds a run (checkpoint-000006.pt, metrics.jsonl, "
        "result.json, TensorBoard events); pass --resume to continue it, --overwrite to start it again, or "
        "another --out")
    assert captured.out == ""  # refused before the run began
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_the_run_and_its_tensorboard_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "8", "--checkpoint-every", "2", "--out", str(out)]) == 0
    assert main([*TINY, "--steps", "4", "--out", str(out), "--overwrite"]) == 0
    assert [r["step"] for r in _records(out) if r["kind"] == "step"] == [1, 2, 3, 4]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint-000004.pt"]
    assert json.loads((out / "result.json").read_text())["steps"] == 4
    assert main([*TINY, "--steps", "4", "--out", str(out), "--overwrite", "--resume"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_keep_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "5", "--checkpoint-every", "1", "--keep-checkpoints", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint*")) == [f"checkpoint-00000{s}.pt" for s in (3, 4, 5)]
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--keep-checkpoints", "0", "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2 and "--keep-checkpoints" in capsys.readouterr().err


def test_resume_skips_a_damaged_newest_checkpoint_saying_which_and_why(tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*TINY, "--steps", "6", "--out", str(whole)]) == 0
    assert main([*TINY, "--steps", "6", "--out", str(part), "--stop-at", "4", "--checkpoint-every", "2"]) == 0
    newest = part / "checkpoint-000004.pt"
    newest.write_bytes(newest.read_bytes()[:3000])  # a copy cut short
    capsys.readouterr()
    assert main([*TINY, "--steps", "6", "--out", str(part), "--resume"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"mixprec train: warning: checkpoint '{newest}' is truncated: 2")
    assert "skipped it, resuming from an older checkpoint" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "resuming at step 2 from checkpoint-000002.pt" in captured.out
    assert _records(part) == _records(whole)
