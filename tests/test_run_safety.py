"""No run lost (issue 28): one run per folder at a time (its lock), only finite checkpoints kept, a
checkpoint this mixprec cannot read never deleted, --overwrite only once everything is checked, and a
resume refused unless it injects the faults its run was started with (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixprec as mp
from mixprec.cli import main
from mixprec.harness import training
from mixprec.harness.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from mixprec.harness.processes import LOCK_NAME, _proc_start, run_folder_lock
from mixprec.harness.run_state import LOG_EVERY, NonFiniteWeightsError, nonfinite_weights
from mixprec.harness.training import MAX_THREADS, train
from mixprec.harness.validation import data_sha256
from mixprec.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["train", "--recipe", "tiny-updates", "--policy", "f16-master", "--no-progress", "--threads", "1"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _lock(folder: Path, pid: int, host: str | None = None, proc_start: str | None = None) -> Path:
    """Write the lock file a process ``pid`` would hold (of this host unless ``host``)."""
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-01T10:00:00",
                                "proc_start": proc_start}))
    return path


# ----- 1. one run per folder ---------------------------------------------------------------------------


def test_a_run_resume_or_overwrite_of_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_taken_over(
        tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--steps", "100000", "--checkpoint-every", "5", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "mixprec", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list_checkpoints(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and list_checkpoints(out), "the first run wrote no checkpoint"
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for extra in ([], ["--resume"], ["--overwrite"]):  # --stop-at 1: had one started, it would end soon
            assert main([*args, *extra, "--stop-at", "1"]) == 2, extra
            captured = capsys.readouterr()
            assert captured.err == (
                f"mixprec train: error: output folder '{out}' is in use by another run: pid {first.pid} (started "
                f"{holder['started']}); wait for it to end or stop it (kill {first.pid}), or choose another --out\n")
            assert captured.out == ""
        assert first.poll() is None and list_checkpoints(out)  # the first run trains on, its checkpoints there
    finally:
        first.kill()
        first.wait(timeout=30)
    step = list_checkpoints(out)[-1][0]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # a SIGKILL leaves the lock behind
    assert main([*args, "--resume", "--stop-at", str(step + 2)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"mixprec train: warning: took over the lock of output folder '{out}': it was held by "
                          f"pid {first.pid} on {socket.gethostname()} (started {holder['started']}), which is no "
                          "longer running\n")
    assert list_checkpoints(out)[-1][0] == step + 2 and not (out / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the racing processes")
@pytest.mark.parametrize("stale", [False, True], ids=["free folder", "stale lock"])
def test_processes_racing_for_a_folder_take_it_one_at_a_time(tmp_path, stale):
    if stale:  # a killed run's lock: its pid is gone (proc_start: a reused pid is not it either)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        _lock(tmp_path, gone.pid, proc_start="1")
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    children = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:  # a child: wait for the start, race for the lock, say how it went
            try:
                os.read(go_read, 1)
                warned: list[str] = []
                try:
                    with run_folder_lock(tmp_path, warn=warned.append):
                        os.write(done_write, b"W" if warned else b"T")
                        time.sleep(2.0)  # held while the others try
                except ValueError as error:
                    os.write(done_write, b"R" if "is in use by another run" in str(error) else b"?")
            finally:
                os._exit(0)
        children.append(pid)
    os.write(go_write, b"x" * len(children))  # all at once
    for pid in children:
        os.waitpid(pid, 0)
    os.close(done_write)
    outcomes = sorted(os.read(done_read, 100).decode())
    for fd in (go_read, go_write, done_read):
        os.close(fd)
    # One took it, the others were refused; over a stale lock, at most the one that took it says it took it over.
    taken = ["T", "W"] if stale else ["T"]
    assert outcomes in [sorted([took] + ["R"] * 5) for took in taken]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_host_or_unreadable_is_refused_a_reused_pid_is_stale(tmp_path):
    path = _lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(ValueError, match=f"in use by pid 1 on host elsewhere .* cannot be checked from here; wait "
                                         f"for that run to end, or if it has, delete {re.escape(repr(str(path)))}"):
        with run_folder_lock(tmp_path):
            pass
    path.write_text("{half")
    with pytest.raises(ValueError, match="is locked by .*, which cannot be read; if no run uses the folder, delete"):
        with run_folder_lock(tmp_path):
            pass
    if not Path("/proc/self/stat").exists():
        return  # where /proc cannot tell a reused pid, a live pid's lock stays taken
    _lock(tmp_path, os.getppid(), proc_start="1")  # a live pid, but not the process that took the lock
    warned: list[str] = []
    with run_folder_lock(tmp_path, warn=warned.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(warned) == 1 and "no longer running" in warned[0] and not path.exists()


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = _lock(tmp_path, holder.pid, proc_start=_proc_start(holder.pid))
        before = path.read_bytes()
        with pytest.raises(ValueError, match=f"is in use by another run: pid {holder.pid} "):
            train("tiny-updates", "f16-master", steps=2, out=tmp_path, threads=1)
        # Rank 1 of a torchrun group: it trains (rank 0 alone writes), and neither takes nor touches the lock.
        monkeypatch.setattr(training, "rank_and_world_size", lambda: (1, 1))
        monkeypatch.setattr("mixprec.cli.train.rank_and_world_size", lambda: (1, 1))
        assert train("tiny-updates", "f16-master", steps=2, out=tmp_path, threads=1).steps == 2
        assert main([*TINY, "--steps", "2", "--out", str(tmp_path)]) == 0
        assert capsys.readouterr().out == "" and path.read_bytes() == before and list_checkpoints(tmp_path) == []
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ----- 2. the storm guard and non-finite weights: only finite checkpoints ---------------------------------


class NaNAtStep(torch.optim.SGD):
    """SGD that writes NaN into one of its parameters (an FP32 master, under f16-master) at its ``at``-th
    step: weights made non-finite by the optimizer itself."""

    def __init__(self, params, lr: float, at: int, index: int) -> None:
        super().__init__(params, lr=lr, momentum=0.9)
        self.at, self.index, self.steps = at, index, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps == self.at:
            [p for group in self.param_groups for p in group["params"]][self.index].view(-1)[0] = math.nan
        return loss


@pytest.mark.parametrize("name, index, stop", [("4.bias", 5, 15), ("0.weight", 0, 14)],
                         ids=["finite gradients after (applied on)", "nan gradients after (mp.step's check)"])
def test_nan_weights_are_never_checkpointed_and_the_last_finite_checkpoint_stays(tmp_path, name, index, stop):
    # NaN into the output bias: an L1 loss's gradient at NaN is 0, so every later step is applied; the
    # run stops at the next read of the weights (the checkpoint at 15). NaN into 0.weight: the next
    # gradients are NaN (skipped), and mp.step finds the weights on the step after (14): the storm path.
    recipe = dataclasses.replace(get_recipe("underflow"),
                                 make_optimizer=lambda params, r: NaNAtStep(params, r.lr, at=12, index=index))
    run = tmp_path / "run"
    with pytest.raises(mp.NaNStormError) as caught:
        train(recipe, "f16-master", steps=40, out=run, checkpoint_every=5, keep=1, threads=1)
    error = caught.value
    assert error.reason == "weights" and error.step == stop and error.weights == {name: "nan"}
    assert isinstance(error, NonFiniteWeightsError) == (name == "4.bias")
    assert f"the last good state is saved in {run / 'checkpoint-000010.pt'}".lower() in str(error).lower()
    assert [s for s, _ in list_checkpoints(run)] == [10]  # keep=1: the NaN state did not rotate it away
    assert nonfinite_weights(load_checkpoint(run / "checkpoint-000010.pt")) == {}


def test_an_lr_of_nan_stops_the_run_instead_of_applying_steps_to_nan_weights_forever():
    def sgd(params, recipe):  # lr nan for the output bias alone: its gradient stays finite (L1 at NaN: 0)
        params = list(params)
        return torch.optim.SGD([{"params": params[:-1]}, {"params": params[-1:], "lr": math.nan}], lr=recipe.lr,
                               momentum=0.9)

    with pytest.raises(NonFiniteWeightsError) as caught:
        train(dataclasses.replace(get_recipe("underflow"), make_optimizer=sgd), "f16-master", steps=60, threads=1)
    error = caught.value
    assert (error.step, error.since, error.weights, error.skipped_steps) == (LOG_EVERY, 0, {"4.bias": "nan"}, 0)
    assert str(error).startswith(f"the weights of 4.bias: nan hold inf/NaN after step {LOG_EVERY} (finite after "
                                 "step 0), and steps with finite gradients would go on being applied to them")


# ----- 3. checkpoints this mixprec cannot read ------------------------------------------------------------


def _newer_format(path: Path) -> bytes:
    """Make ``path`` a checkpoint of format version 3 (a newer mixprec's); its bytes."""
    path.write_bytes(path.read_bytes().replace(b"MIXPREC-CHECKPOINT 2\n", b"MIXPREC-CHECKPOINT 3\n", 1))
    return path.read_bytes()


@pytest.mark.parametrize("every", [3, 2], ids=["rotated past it", "its step written again"])
def test_a_checkpoint_this_mixprec_cannot_read_is_skipped_and_never_deleted(tmp_path, every, capsys):
    run = tmp_path / "run"
    train("tiny-updates", "f16-master", steps=9, stop_at=4, checkpoint_every=2, out=run, threads=1)  # 2 and 4
    newer = _newer_format(run / "checkpoint-000004.pt")
    shutil.copytree(run, tmp_path / "cli")
    with pytest.warns(UserWarning) as caught:
        train("tiny-updates", "f16-master", steps=9, checkpoint_every=every, out=run, resume=True, threads=1)
    messages = [str(w.message) for w in caught]
    assert messages[0].endswith("has format version '3'; this mixprec reads version 2; skipped it, resuming from an "
                                "older checkpoint (the file stays in the folder)")
    if every == 3:  # resumed from 2: checkpoints 3, 6, 9; keep=2 counts only the readable ones
        assert [s for s, _ in list_checkpoints(run)] == [4, 6, 9]
        assert (run / "checkpoint-000004.pt").read_bytes() == newer and len(messages) == 1
    else:  # checkpoint 4 written again: the unreadable one is set aside, not replaced
        assert (run / "checkpoint-000004.pt.unreadable").read_bytes() == newer
        assert messages[1].endswith("does not replace it: it is kept as 'checkpoint-000004.pt.unreadable'")
        assert [s for s, _ in list_checkpoints(run)] == [8, 9]
    # The command line says the same, one line each.
    capsys.readouterr()
    assert main([*TINY, "--steps", "9", "--checkpoint-every", str(every), "--out", str(tmp_path / "cli"),
                 "--resume"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(messages)
    assert all(line.startswith("mixprec train: warning: checkpoint '") for line in lines)
    assert lines[-1].endswith(messages[-1].split("checkpoint-000004.pt' ", 1)[1])


def test_with_no_readable_checkpoint_resume_changes_nothing_and_says_what_overwrite_deletes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "6", "--stop-at", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    for step in (2, 4):
        _newer_format(out / f"checkpoint-00000{step}.pt")
    before = _files(out)
    capsys.readouterr()
    assert main([*TINY, "--steps", "6", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("has format version '3'") == 2
    assert err.endswith("Nothing was changed (a checkpoint mixprec cannot read is never deleted); resume with the "
                        "mixprec of that format version; to keep these files, start the run in another "
                        "folder (--out, out=), or again here with --overwrite (overwrite=True), which deletes them\n")
    assert _files(out) == before


# ----- 4. --overwrite removes the old run only once everything is checked ----------------------------------


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old") / "run"
    assert main([*TINY, "--steps", "4", "--out", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("case", ["fault target", "policy", "threads", "batch"])
def test_overwrite_checks_everything_before_it_removes_the_old_run(case, old_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    before = _files(out)
    big = tmp_path / "big_batch.py"
    big.write_text("import dataclasses\nfrom mixprec.recipes import get_recipe\n"
                   "recipe = dataclasses.replace(get_recipe('tiny-updates'), batch_size=8192)\n")
    args, expected = {
        "fault target": ([*TINY, "--inject-faults", "grad[nope]:nan@3"], "the model has no parameter named 'nope'"),
        "policy": ([*TINY[:4], "bf16-compact,params=f16", *TINY[5:]], "but master mode 'compact' keeps"),
        "threads": ([*TINY[:-1], "100000"], f"argument --threads: must be an integer in 1..{MAX_THREADS}"),
        "batch": (["train", "--recipe", f"{big}:recipe", *TINY[3:]], "has batch_size 8192, larger than its training "
                                                                     "set (4096 rows)"),
    }[case]
    try:
        code = main([*args, "--steps", "4", "--out", str(out), "--overwrite"])
    except SystemExit as exit_info:  # argparse's refusal
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert _files(out) == before  # the old run is all there, byte for byte
    if case == "threads":
        with pytest.raises(ValueError, match=f"threads must be in 1..{MAX_THREADS} .*, got 100000"):
            train("tiny-updates", "f16-master", steps=4, out=out, overwrite=True, threads=100000)
        assert _files(out) == before


# ----- 6. a resume injects the faults of the run it continues -------------------------------------------


def test_a_resume_must_inject_the_faults_its_run_was_started_with(tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    faults = ["--inject-faults", "grad:nan@3;loss:inf@5"]
    assert main([*TINY, "--steps", "8", *faults, "--out", str(whole)]) == 0
    assert main([*TINY, "--steps", "8", *faults, "--stop-at", "4", "--out", str(part)]) == 0
    recorded = "grad:nan@3;loss:inf@5;seed=0"
    assert load_checkpoint(part / "checkpoint-000004.pt")["faults"] == recorded
    assert json.loads((part / "result.json").read_text())["faults"] == recorded
    before = _files(part)
    capsys.readouterr()
    for other, shown in [([], "none"), (["--inject-faults", "grad:nan@3"], "grad:nan@3;seed=0")]:
        assert main([*TINY, "--steps", "8", *other, "--out", str(part), "--resume"]) == 2
        assert capsys.readouterr().err == (
            f"mixprec train: error: the checkpoint is of another run: faults (--inject-faults) {recorded} (asked: "
            f"{shown}) (checkpoint '{part / 'checkpoint-000004.pt'}'); resume with the same settings, or start this "
            "run in another folder (--out, out=)\n")
        assert _files(part) == before
    assert main([*TINY, "--steps", "8", *faults, "--out", str(part), "--resume"]) == 0
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


def test_a_checkpoint_from_before_faults_were_recorded_still_resumes(tmp_path):
    run = tmp_path / "run"
    train("tiny-updates", "f16-master", steps=6, stop_at=3, out=run, threads=1)
    path = run / "checkpoint-000003.pt"
    state = load_checkpoint(path)
    del state["faults"], state["max_skips_in_a_row"]  # as mixprec wrote them before
    path.unlink()
    save_checkpoint(run, state)
    result = train("tiny-updates", "f16-master", steps=6, out=run, resume=True, faults="grad:nan@5", threads=1)
    assert result.steps == 6 and result.faults == "grad:nan@5;seed=0" and result.skipped_steps == 1
    assert load_checkpoint(run / "checkpoint-000006.pt")["faults"] == "grad:nan@5;seed=0"


# ----- 12. a folder (or pipe) with a checkpoint's name is not a checkpoint ---------------------------------


def test_a_folder_or_pipe_with_a_checkpoints_name_is_skipped_never_read_nor_deleted(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-000099.pt").mkdir(parents=True)
    (out / "checkpoint-000099.pt" / "notes.txt").write_text("mine")
    (out / "checkpoint-000004.pt").mkdir()  # in the way of a checkpoint this run writes
    (out / ".checkpoint-000002.pt.x.tmp").mkdir()  # a folder with a temporary file's name
    if hasattr(os, "mkfifo"):
        os.mkfifo(out / "checkpoint-000050.pt")  # reading it would block forever
    assert main([*TINY, "--steps", "6", "--stop-at", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    skipped = "not a file: it is not a checkpoint, so it is skipped (it stays in the folder)"
    fifo = [f"'{out / 'checkpoint-000050.pt'}' has a checkpoint's name but is a named pipe, {skipped}"] * hasattr(
        os, "mkfifo")
    assert lines == [f"mixprec train: warning: {line}" for line in [
        f"'{out / 'checkpoint-000004.pt'}' has a checkpoint's name but is a directory, {skipped}", *fifo,
        f"'{out / 'checkpoint-000099.pt'}' has a checkpoint's name but is a directory, {skipped}",
        f"checkpoint '{out / 'checkpoint-000004.pt'}' is a directory, not a checkpoint, so this run's checkpoint of "
        "the same step does not replace it: it is kept as 'checkpoint-000004.pt.unreadable'"]]
    assert (out / "checkpoint-000004.pt.unreadable").is_dir() and (out / ".checkpoint-000002.pt.x.tmp").is_dir()
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert main([*TINY, "--steps", "6", "--checkpoint-every", "2", "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().err.count("is a directory, not a file: it is not a checkpoint") == 1
    assert (out / "checkpoint-000099.pt" / "notes.txt").read_text() == "mine"
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    with pytest.raises(ValueError, match="checkpoint-000099.pt' is a directory, not a checkpoint file$"):
        load_checkpoint(out / "checkpoint-000099.pt")


# ----- 7/11. a checkpoint whose contents do not fit the run is skipped like a damaged one -----------------


def _rewrite(path: Path, state: dict) -> None:
    """Write ``state`` into ``path`` as a checkpoint with a valid checksum (whatever its step says)."""
    folder = path.parent / "rewrite"
    folder.mkdir(exist_ok=True)
    written = save_checkpoint(folder, state)
    path.write_bytes(written.read_bytes())
    shutil.rmtree(folder)


def _edit(state: dict, case: str) -> tuple[dict, str]:
    """``state`` edited as ``case`` says, and what the warning says is wrong."""
    model, rng, history = dict(state["model"]), dict(state["rng"]), state["history"]
    key = next(iter(model))
    edits = {
        "step past its history": ({"step": 8}, "its step is 8 but its history holds steps 1..6 (6 records); a "
                                               "history of steps 1..8 was expected"),
        "negative step": ({"step": -5}, "its step -5 is not in 0..8 (the run's steps)"),
        "empty history": ({"history": []}, "its history does not begin with the evaluation at step 0 (it holds 0 "
                                           "records), at step 6"),
        "tensor shape": ({"model": {**model, key: torch.zeros(3, 3)}},
                         f"its model state's {key!r} has shape (3, 3), the model's has {tuple(model[key].shape)}"),
        "extra key": ({"model": {**model, "extra": torch.zeros(1)}}, "its model state has keys the model lacks "
                                                                      "['extra'] and lacks keys []"),
        "RNG state": ({"rng": {**rng, "torch": torch.zeros(3, dtype=torch.uint8)}},
                      "its torch RNG state is not a torch.uint8 tensor of shape (5056,)"),
        "python RNG state": ({"rng": {**rng, "python": [3, [1, 2], None]}}, "its RNG state does not load: "),
        "scheduler state": ({"scheduler": {**state["scheduler"], "last_epoch": "abc"}},
                            "its LR schedule state's 'last_epoch' is 'abc', not like "),
    }
    change, reason = edits[case]
    return {**state, **change, "history": change.get("history", history)}, reason


@pytest.fixture(scope="module")
def whole_run():
    return train("tiny-updates", "f16-master", steps=8, threads=1)


@pytest.mark.parametrize("case", ["step past its history", "negative step", "empty history", "tensor shape",
                                  "extra key", "RNG state", "python RNG state", "scheduler state"])
def test_a_checkpoint_with_edited_contents_falls_back_to_the_older_one(case, whole_run, tmp_path):
    run = tmp_path / "run"
    train("tiny-updates", "f16-master", steps=8, stop_at=6, checkpoint_every=2, out=run, threads=1)  # 4 and 6
    newest = run / "checkpoint-000006.pt"
    edited, reason = _edit(load_checkpoint(newest), case)
    _rewrite(newest, edited)
    before = newest.read_bytes()
    with pytest.warns(UserWarning) as caught:
        result = train("tiny-updates", "f16-master", steps=8, out=run, resume=True, threads=1)
    [message] = [str(w.message) for w in caught]
    assert message.startswith(f"checkpoint '{newest}' does not fit this run: {reason}")
    assert message.endswith("; skipped it, resuming from an older checkpoint (the file stays in the folder)")
    assert result.history == whole_run.history  # resumed from step 4: no gap, no step trained twice
    assert newest.read_bytes() == before  # skipped, not removed
    if case == "step past its history":  # the command line: one line, then the run resumes from step 4
        _rewrite(newest, edited)
        assert main([*TINY, "--steps", "8", "--checkpoint-every", "2", "--out", str(run), "--resume"]) == 0


def test_a_checkpoint_that_does_not_fit_is_refused_when_named_and_when_none_fits(tmp_path, capsys):
    run = tmp_path / "run"
    train("tiny-updates", "f16-master", steps=8, stop_at=4, checkpoint_every=2, out=run, threads=1)  # 2 and 4
    for step in (2, 4):
        path = run / f"checkpoint-00000{step}.pt"
        _rewrite(path, {**load_checkpoint(path), "history": []})
    with pytest.raises(ValueError, match=r"checkpoint '.*checkpoint-000002.pt' does not fit this run: its history "
                                         r"does not begin with the evaluation at step 0"):
        train("tiny-updates", "f16-master", steps=8, out=run, resume=run / "checkpoint-000002.pt", threads=1)
    before = _files(run)
    assert main([*TINY, "--steps", "8", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("does not fit this run") == 2 and "no intact checkpoint" in err
    assert _files(run) == before


# ----- 5. the data: made on one thread, its checksum recorded and checked on resume ------------------------


def test_the_data_are_made_on_one_thread_recorded_and_checked_on_resume(tmp_path):
    recipe = get_recipe("tiny-updates")
    seen: list[int] = []

    def make_data():
        seen.append(torch.get_num_threads())
        return recipe.make_data()

    counting = dataclasses.replace(recipe, make_data=make_data)
    run = tmp_path / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(counting, "f16-master", steps=6, stop_at=3, out=run, threads=2)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]  # whatever the thread count outside and --threads
    path = run / "checkpoint-000003.pt"
    assert load_checkpoint(path)["data_sha256"] == data_sha256(recipe.make_data())

    def other_data():
        data = recipe.make_data()
        return dataclasses.replace(data, train=(data.train[0] + 1e-3, *data.train[1:]))

    with pytest.raises(ValueError, match=r"^the recipe's data differ from the data checkpoint '.*checkpoint-000003.pt' "
                                         r"was trained on \(sha256 [0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.\): its "
                                         r"make_data has changed"):
        train(dataclasses.replace(recipe, make_data=other_data), "f16-master", steps=6, out=run, resume=True,
              threads=1)
    state = load_checkpoint(path)
    del state["data_sha256"]  # as mixprec wrote it before: not checked
    _rewrite(path, state)
    result = train(dataclasses.replace(recipe, make_data=other_data), "f16-master", steps=6, out=run, resume=True,
                   threads=1)
    assert result.steps == 6


# ----- a full disk (ENOSPC): one line, exit status 1, nothing half-written, older checkpoints intact --------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["checkpoint", "metrics.jsonl", "tensorboard"])
def test_a_full_disk_stops_the_run_in_one_line_and_leaves_nothing_half_written(target, tmp_path, monkeypatch,
                                                                                capsys):
    from torch.utils.tensorboard import SummaryWriter

    from mixprec.harness import checkpoints
    out = tmp_path / "run"
    second = out / "checkpoint-000002.pt"
    if target == "checkpoint":  # the disk fills up while the step-4 checkpoint is written: its fsync fails
        real_fsync = checkpoints.os.fsync

        def fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode) and second.exists():
                _no_space()
            real_fsync(fd)

        monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    elif target == "metrics.jsonl":  # the 5th record is half written, then the disk is full
        real_open, lines = Path.open, []

        class HalfFull:
            def __init__(self, file):
                self.file = file

            def write(self, data):
                lines.append(data)
                if len(lines) == 5:
                    self.file.write(data[: len(data) // 2])
                    _no_space()
                return self.file.write(data)

            def __getattr__(self, name):
                return getattr(self.file, name)

        def open_(path, mode="r", *args, **kwargs):
            file = real_open(path, mode, *args, **kwargs)
            return HalfFull(file) if path.name == "metrics.jsonl" and "a" in mode else file

        monkeypatch.setattr(Path, "open", open_)
    else:
        real_add, calls = SummaryWriter.add_scalar, []

        def add_scalar(self, *args, **kwargs):
            calls.append(args)
            if len(calls) > 12:
                _no_space()
            return real_add(self, *args, **kwargs)

        monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    code = main([*TINY, "--steps", "8", "--checkpoint-every", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mixprec train: stopped: writing '") and "No space left on device" in err
    assert not list(out.glob(".*.tmp")) and not (out / "result.json").exists()
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().split("\n")[:-1])
    if target == "checkpoint":
        assert f"writing '{out / 'checkpoint-000004.pt'}' failed" in err
        assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-000002.pt"]
        assert load_checkpoint(second)["step"] == 2
        assert f"the newest, '{second}', is intact: free some space, then continue the run with --resume" in err
        monkeypatch.undo()
        assert main([*TINY, "--steps", "8", "--checkpoint-every", "2", "--out", str(out), "--resume"]) == 0
    elif target == "metrics.jsonl":
        assert f"writing '{out / 'metrics.jsonl'}' failed" in err
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # the torn 5th line cut off
    else:
        assert "writing '" + str(out / "events.out.tfevents.") in err


@pytest.mark.parametrize("kind", [None, "", 3])
def test_a_scaler_state_dict_without_a_kind_says_what_was_expected(kind):
    state = mp.DynamicScaler().state_dict()
    state["kind"] = kind
    with pytest.raises(ValueError) as error:
        mp.DynamicScaler().load_state_dict(state)
    assert str(error.value) == (f"this state dict's 'kind' is {kind!r}, not a scaler's name: expected 'DynamicScaler' "
                                "(what DynamicScaler.state_dict() writes); load what a scaler's state_dict() returned")
