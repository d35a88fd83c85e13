"""`python -m mixprec` and `torchrun -m mixprec train`: two CPU processes (gloo) against one.

Each torchrun launch starts three Python processes that import torch: about 10 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import run_command, torchrun_command
from mixprec.cli import main
from mixprec.harness.training import train

STEPS = 30
TIMEOUT_S = 120  # one torchrun launch (its three Python processes), or one plain `python -m mixprec`


def _train_two(out: Path, recipe: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_command(torchrun_command("-m", "mixprec", "train", "--recipe", recipe, "--policy", "f32",
                                        "--steps", str(STEPS), "--no-progress", "--out", str(out), *extra),
                       timeout=TIMEOUT_S)


def _result(out: Path) -> dict[str, Any]:
    return json.loads((out / "result.json").read_text())


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in history if r["kind"] == "step"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 2-process digits run (shared: it is the slow part)."""
    out = tmp_path_factory.mktemp("torchrun") / "whole"
    return out, _train_two(out, "digits").stdout


def test_python_m_mixprec_runs_the_cli():
    top = run_command([sys.executable, "-m", "mixprec", "--help"], timeout=60)
    assert "train" in top.stdout and "compare" in top.stdout
    train_help = run_command([sys.executable, "-m", "mixprec", "train", "--help"], timeout=60)
    assert "--resume" in train_help.stdout and "--stop-at" in train_help.stdout


def test_two_processes_write_one_set_of_files_and_land_near_one_process(two_processes):
    out, stdout = two_processes
    # Rank 0 alone prints and writes: one header, one metrics.jsonl, one result.json, one TensorBoard file.
    assert stdout.count("mixprec train:") == 1 and "2 processes" in stdout
    assert stdout.count(f"finished step {STEPS}") == 1
    assert len(list(out.glob("events.out.tfevents.*"))) == 1 and (out / f"checkpoint-{STEPS:06d}.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, STEPS + 1))
    two = _result(out)
    assert two["world_size"] == 2 and two["steps"] == STEPS

    one = train("digits", "f32", steps=STEPS, threads=1)
    assert one.world_size == 1
    # Not reduction-order noise alone: digits has BatchNorm, whose batch statistics each rank takes over
    # its own 32 rows instead of the global 64 (DDP without SyncBatchNorm, which needs a GPU). Measured
    # at 30 steps, seeds 0-5: 0 to 3 of the 359 test images classified differently (<= 0.0084), while
    # seed-to-seed spread of one process is 0.025. Allow about twice the measured gap.
    assert two["final_metric"] == pytest.approx(one.final_metric, abs=0.02)
    # The logged losses are the global batch's mean (averaged over ranks), not one rank's.
    assert _losses(two["history"]) == pytest.approx(_losses(one.history), rel=0.05)


def test_without_batchnorm_two_processes_match_one_to_reduction_order(tmp_path):
    # tiny-updates (a Linear layer, MSE): the global batch and its mean loss are exactly one process's,
    # so only the order of the gradient sums differs. Measured: relative gaps of about 1e-7.
    _train_two(tmp_path / "two", "tiny-updates")
    two = _result(tmp_path / "two")
    one = train("tiny-updates", "f32", steps=STEPS, threads=1)
    assert two["final_metric"] == pytest.approx(one.final_metric, rel=1e-5)
    assert _losses(two["history"]) == pytest.approx(_losses(one.history), rel=1e-5)


def test_stop_and_resume_under_torchrun_matches_an_uninterrupted_run(two_processes, tmp_path):
    whole, _ = two_processes
    part = tmp_path / "part"
    assert "stopped at step 12" in _train_two(part, "digits", "--stop-at", "12").stdout
    assert "resuming at step 12" in _train_two(part, "digits", "--resume").stdout
    a, b = _result(whole), _result(part)
    assert b["steps"] == STEPS
    # Every rank loads rank 0's checkpoint; on the CPU the continued run is bitwise the uninterrupted one.
    assert b["history"] == a["history"] and b["final_metric"] == a["final_metric"]
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


def test_batch_size_not_divisible_by_the_processes_is_one_clear_line(monkeypatch, tmp_path, capsys):
    # The environment torchrun gives 3 processes; the check runs before any process group is joined.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--recipe", "digits", "--policy", "f32", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "mixprec train: error: recipe 'digits' has batch_size 64, which 3 processes cannot split evenly "
        "(each trains on an equal slice of every batch); run 1, 2, 4, 8, 16 processes, or give the recipe "
        "a batch_size divisible by 3")
    assert "mixprec train:" not in captured.out  # failed before the run began
    with pytest.raises(ValueError, match="3 processes cannot split evenly"):
        train("digits", "f32", steps=1)


@pytest.mark.parametrize("command", [["compare", "--recipe", "digits", "--policies", "f32"], ["demo"]])
def test_compare_and_demo_refuse_several_processes(command, monkeypatch, tmp_path, capsys):
    # They train many runs into one report: one process's job. The check runs before any training.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*command, "--out", str(tmp_path), "--no-progress"]) == 2
    assert f"{command[0]} runs in one process, not 2 (torchrun)" in capsys.readouterr().err


def test_master_weights_under_torchrun_killed_mid_run_and_resumed_match_an_uninterrupted_run(tmp_path):
    # f16-master (FP32 masters reduced through mixprec's DDP hook), the whole process group SIGKILLed once
    # the first checkpoint is on disk, then --resume: it finishes, and its history (from the checkpoint) is
    # bitwise the uninterrupted run's.
    args = ["-m", "mixprec", "train", "--recipe", "digits", "--policy", "f16-master", "--steps", str(STEPS),
            "--no-progress", "--checkpoint-every", "5"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_command(torchrun_command(*args, "--out", str(whole)), timeout=TIMEOUT_S)
    proc = subprocess.Popen(torchrun_command(*args, "--out", str(part)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not list(part.glob("checkpoint-*.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: raise STEPS"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = run_command(torchrun_command(*args, "--out", str(part), "--resume"), timeout=TIMEOUT_S)
    assert "resuming at step" in resumed.stdout
    a, b = _result(whole), _result(part)
    assert b["steps"] == STEPS and b["world_size"] == 2
    assert b["history"] == a["history"] and b["final_metric"] == a["final_metric"]


def test_injected_faults_under_torchrun_skip_the_same_steps_as_one_process(tmp_path):
    # Every rank draws the same faults (a pure function of seed, clause and step) and the ranks agree on
    # found-inf: the 2-process run skips exactly where the 1-process run does, and trains on after.
    faults = "grad:inf@4,8;loss:nan@10;act:inf@rate=0.1;seed=2"
    run_command(torchrun_command("-m", "mixprec", "train", "--recipe", "tiny-updates", "--policy", "f16-master",
                                 "--steps", "16", "--no-progress", "--out", str(tmp_path / "two"),
                                 "--inject-faults", faults), timeout=TIMEOUT_S)
    two = _result(tmp_path / "two")
    one = train("tiny-updates", "f16-master", steps=16, threads=1, faults=faults)
    skipped = [[r["step"] for r in history if r["kind"] == "step" and not r["applied"]]
               for history in (two["history"], one.history)]
    assert {4, 8, 10} <= set(skipped[0]) and skipped[0] == skipped[1]
    assert two["final_metric"] == pytest.approx(one.final_metric, rel=1e-3)
