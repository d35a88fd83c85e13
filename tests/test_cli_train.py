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
                                   "underflow, tiny-updates, detection, speech, translation, gpt, gpt2-small, "
                                   "gpt-medium (or module.path:object for your own)")


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


# ----- unclear errors (issue 28): one line that says what was wrong and how to fix it, nothing created ---------


def test_resume_of_a_run_that_wrote_no_checkpoint_advises_what_the_tool_accepts(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "metric": 1.0}\n')
    assert main([*TINY, "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"mixprec train: error: no checkpoint to resume from in '{out}': it holds a run (metrics.jsonl) that wrote "
        "none: start the run again with --overwrite, which deletes those files\n")
    assert main([*TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 0  # the advice is accepted


def test_a_checkpoint_of_another_recipe_is_named(tmp_path, capsys):
    (tmp_path / "my_tasks.py").write_text(MY_TASKS)
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "4", "--stop-at", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    mine = ["--recipe", f"{tmp_path}/my_tasks.py:recipe", "--policy", "f16-master", "--steps", "4"]
    assert main(["train", *mine, "--no-progress", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (
        "mixprec train: error: the checkpoint is of another run: recipe 'tiny-updates' (asked: 'mine') (checkpoint "
        f"'{out / 'checkpoint-000002.pt'}'); resume with the same settings, or start this run in another folder "
        "(--out, out=)\n")


@pytest.mark.parametrize("extra, expected", [
    (["--out", ""], "argument --out: must name a folder, got ''"),
    (["--policy", "f32"], "argument --policy: given twice ('f16-master' and 'f32'); give it once"),
    (["--recipe", "digits"], "argument --recipe: given twice ('tiny-updates' and 'digits'); give it once"),
    (["--seed", "1", "--seed", "2"], "argument --seed: given twice ('1' and '2'); give it once"),
    (["--steps", "2", "--steps", "3"], "argument --steps: given twice ('2' and '3'); give it once"),
], ids=["empty out", "policy", "recipe", "seed", "steps"])
def test_an_empty_out_or_a_repeated_option_is_refused_and_nothing_is_written(extra, expected, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, *extra] + (["--out", "run"] if "--out" not in extra else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, expected", [
    (["--resume", "--overwrite"], "--resume continues the run in the folder and --overwrite replaces it: pass one"),
    (["--resume"], "no checkpoint to resume from in '{out}': the folder does not exist (nothing was created); check "
                   "its name, or start the run there without --resume"),
    (["--inject-faults", "grad[nope]:nan@3"], "fault 'grad[nope]:nan@3': the model has no parameter named 'nope'"),
], ids=["resume and overwrite", "resume a missing folder", "unknown fault target"])
def test_refused_before_the_folder_is_made(extra, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "4", "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert expected.format(out=out) in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not out.exists()


WARNING_TASKS = '''
import dataclasses
import torch
import mixprec.recipes.tiny_updates as base

def loss(model, batch):
    torch.tensor(batch[0])  # torch warns: "To copy construct from a tensor, it is recommended to use ..."
    return base.recipe().loss(model, batch)

recipe = dataclasses.replace(base.recipe(), name="warns", loss=loss)
'''


@pytest.mark.parametrize("policy, where", [("f32", "UserWarning (warning_tasks.py:7): "), ("f16-master", "")])
def test_torch_warnings_during_train_are_one_line_each_and_shown_once(policy, where, tmp_path, capsys):
    # emulated, the warning's Python frame is mixprec's emulation (a torch function mode): shown as mixprec's
    (tmp_path / "warning_tasks.py").write_text(WARNING_TASKS)
    assert main(["train", "--recipe", f"{tmp_path}/warning_tasks.py:recipe", "--policy", policy, "--steps",
                 "4", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"mixprec train: warning: {where}To copy construct from a tensor, it is recommended"), err
    assert len(err.strip().splitlines()) == 1  # 4 steps, one line
