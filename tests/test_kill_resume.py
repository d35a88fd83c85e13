"""`mixprec train` killed with SIGKILL at random moments, and resumed: nothing lost, nothing corrupted.

One run of the underflow recipe (f16-master: FP32 masters, a dynamic loss scaler, SGD with momentum, an
LR schedule), checkpointed at every step so that many kills land inside a checkpoint write, is killed
KILLS times, each time resumed with ``--resume``, then finished. Its parameters, result, metrics.jsonl,
checkpoints (with their histories) and TensorBoard scalars must equal an uninterrupted run's, record for
record.

The uninterrupted run and the final resume are plain ``python -m mixprec train`` processes. The killed
attempts are forked, one at a time, from a process that has imported mixprec's CLI (and torch) once:
each is a process of its own running ``mixprec.cli.main(["train", ...])`` from its argument parsing on,
and is SIGKILLed like any other, but starts in milliseconds instead of the ~3 s of importing torch on a
2-core machine (20 kills: ~1 minute saved).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from helpers import named_tensors, run_command
from mixprec.cli import main
from mixprec.harness.checkpoints import find_checkpoint, list_checkpoints, load_checkpoint

KILLS = 20
STEPS = 300
ARGS = ["train", "--recipe", "underflow", "--policy", "f16-master", "--steps", str(STEPS), "--threads", "1",
        "--no-progress", "--checkpoint-every", "1"]
TRAIN = [sys.executable, "-m", "mixprec", *ARGS]
TIMING_FIELDS = ("seconds_per_step", "environment")  # wall-clock figures and the machine: not the run's numbers

# Reads one JSON line per attempt ({"args": [...], "stderr": path}), forks a child that runs the CLI
# with those arguments, prints the child's pid, waits for it and prints its exit code.
LAUNCHER = """
import json, os, sys
from mixprec.cli import build_parser, main
build_parser()  # imports every command's module before forking
import torch._dynamo, torch.utils.tensorboard  # imported on first use: by torch.optim, by RunLogger
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            code = main(request["args"])
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Launcher:
    """Starts `mixprec train` attempts as forked processes of one process that imported the CLI once."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.requests, self.replies = self.proc.stdin, self.proc.stdout

    def start(self, args: list[str], stderr: Path) -> int:
        self.requests.write(json.dumps({"args": args, "stderr": str(stderr)}) + "\n")
        self.requests.flush()
        return int(self.replies.readline())

    def wait(self) -> int:
        """The exit code of the attempt started last (negative: killed by that signal)."""
        line = self.replies.readline()
        assert line, "the launcher died"
        return int(line)

    def close(self) -> None:
        self.requests.close()
        self.proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _newest_step(folder: Path) -> int:
    found = list_checkpoints(folder) if folder.is_dir() else []
    return found[-1][0] if found else -1


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


def assert_same_checkpoint(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise equal model, optimizer (FP32 masters), scaler, schedule and RNG states; equal history."""
    keys = ("model", "optimizer", "scaler", "scheduler", "rng")
    ta, tb = dict(named_tensors({k: a[k] for k in keys})), dict(named_tensors({k: b[k] for k in keys}))
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert a["step"] == b["step"] and a["history"] == b["history"]


def tensorboard_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the folder's event file, in the order written."""
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, [f.name for f in files]  # one file: no stale events mixed in
    return [(v.tag, event.step, v.simple_value) for event in EventFileLoader(str(files[0])).Load()
            for v in event.summary.value]


def result(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "result.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING_FIELDS}


def assert_same_run(whole: Path, part: Path) -> None:
    assert result(part) == result(whole)
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert [s for s, _ in list_checkpoints(part)] == [s for s, _ in list_checkpoints(whole)] == [STEPS - 1, STEPS]
    for (_, a), (_, b) in zip(list_checkpoints(whole), list_checkpoints(part), strict=True):
        assert_same_checkpoint(load_checkpoint(a), load_checkpoint(b))
    assert tensorboard_scalars(part) == tensorboard_scalars(whole)
    assert _temp_files(part) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "fork"),
                    reason="forks the killed attempts and watches them through /proc (Linux)")
def test_killed_20_times_at_random_moments_and_resumed_equals_an_uninterrupted_run(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    # The uninterrupted run, side by side with the killed one (its own process: nothing shared).
    reference = subprocess.Popen([*TRAIN, "--out", str(whole)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    launcher = Launcher()
    rng = random.Random(20)  # the kill moments' seed (where they land also depends on the machine's speed)
    moments = ["in a checkpoint write"] * 8 + ["after progress"] * 8 + ["at startup"] * 4
    rng.shuffle(moments)
    stats = {"kills": 0, "resumed": 0, "inside a checkpoint write": 0, "before the first step": 0}
    try:
        for attempt, moment in enumerate(moments):
            # What a user does after a crash: --resume if a checkpoint is there, else start again.
            mode = "--resume" if list_checkpoints(part) else "--overwrite"
            stats["resumed"] += mode == "--resume"
            start_step = _newest_step(part)
            stderr = tmp_path / f"attempt-{attempt}.err"
            pid = launcher.start([*ARGS, "--out", str(part), mode], stderr)
            deadline = time.monotonic() + 60
            if moment == "at startup":  # parsing, building, loading the checkpoint, rewriting the logs
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                while _newest_step(part) <= start_step and _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.001)
                if moment == "after progress":
                    time.sleep(rng.uniform(0.0, 0.03))
                else:  # the moment a temporary checkpoint file exists: mid-write, before os.replace
                    while not _writing(part) and _alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.0002)
            stats["inside a checkpoint write"] += _writing(part)
            stats["before the first step"] += _newest_step(part) == start_step
            os.kill(pid, signal.SIGKILL)
            code = launcher.wait()
            assert code == -signal.SIGKILL, f"attempt {attempt} ended ({code}) before its kill: {stderr.read_text()}"
            stats["kills"] += 1
            if list_checkpoints(part):  # after every kill the newest checkpoint is intact: nothing to skip
                path, _, skipped = find_checkpoint(part)
                assert skipped == [] and path == list_checkpoints(part)[-1][1]
    finally:
        launcher.close()

    run_command([*TRAIN, "--out", str(part), "--resume"], timeout=180)
    _, reference_stderr = reference.communicate(timeout=180)
    assert reference.returncode == 0, reference_stderr
    assert_same_run(whole, part)
    assert stats["kills"] == KILLS and stats["resumed"] >= KILLS - 2, stats
    print(f"kill/resume: {stats}")


def _writing(folder: Path) -> bool:
    return any(name.startswith(".checkpoint-") for name in _temp_files(folder))


# ----- what a kill leaves in the logs, made whole by --resume -------------------------------------------------

SHORT = ["train", "--recipe", "tiny-updates", "--policy", "f16-master", "--steps", "30", "--no-progress",
         "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main([*SHORT, "--out", str(out)]) == 0
    return out


def test_resume_rewrites_metrics_and_tensorboard_from_the_checkpoint_whatever_a_kill_left(uninterrupted, tmp_path):
    part = tmp_path / "part"
    assert main([*SHORT, "--out", str(part), "--stop-at", "20"]) == 0
    # What a kill a few steps after the step-20 checkpoint leaves: records past it, a torn last line,
    # a second TensorBoard file (from an earlier attempt) and a half-written temporary file.
    past = [line for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()
            if 20 < json.loads(line)["step"] <= 24]
    with (part / "metrics.jsonl").open("a") as f:
        f.write("\n".join(past) + '\n{"kind": "step", "step": 25, "loss": 0.00')
    stale = next(uninterrupted.glob("events.out.tfevents.*"))
    (part / "events.out.tfevents.1.earlier.0").write_bytes(stale.read_bytes())
    (part / ".checkpoint-000030.pt.k1ll.tmp").write_bytes(b"half")

    assert main([*SHORT, "--out", str(part), "--resume"]) == 0
    assert_same_logs(uninterrupted, part)


def test_a_run_killed_after_its_last_checkpoint_is_made_whole_by_resume(uninterrupted, tmp_path):
    part = tmp_path / "part"
    assert main([*SHORT, "--out", str(part)]) == 0
    (part / "result.json").unlink()  # killed before writing it, with its last line torn
    text = (part / "metrics.jsonl").read_text()
    (part / "metrics.jsonl").write_text(text[: len(text) - 20])
    assert main([*SHORT, "--out", str(part), "--resume"]) == 0
    assert_same_logs(uninterrupted, part)


def assert_same_logs(whole: Path, part: Path) -> None:
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert tensorboard_scalars(part) == tensorboard_scalars(whole)
    assert result(part) == result(whole)
    assert _temp_files(part) == []
