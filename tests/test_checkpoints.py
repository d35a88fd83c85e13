"""Checkpoint files and run folders: the format and its checks, every kind of damaged file as one line,
falling back to the newest intact checkpoint, rotation, temporary files, and refusing to overwrite a run."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import pytest
import torch

from mixprec.harness.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
)
from mixprec.harness.training import LOG_EVERY, train

FAST = dict(steps=6, threads=1)  # tiny-updates: a Linear layer, Adam, a dynamic scaler: ~10 ms a step


def _run(out: Path, **kwargs):
    return train("tiny-updates", "f16-master", out=out, **{**FAST, **kwargs})


def _with_header(payload: bytes, version: int = CHECKPOINT_VERSION) -> bytes:
    """A file in the checkpoint format around ``payload``, its checksum right."""
    digest = hashlib.sha256(payload).hexdigest()
    return f"{CHECKPOINT_FORMAT} {version}\nsha256 {digest} bytes {len(payload)}\n".encode() + payload


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class Malicious:
    """Unpickling it would run a shell command that leaves a marker file."""

    marker: Path

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> bytes:
    """The bytes of a real checkpoint (tiny-updates, step 6)."""
    out = tmp_path_factory.mktemp("intact")
    _run(out)
    return list_checkpoints(out)[-1][1].read_bytes()


# ----- the format ----------------------------------------------------------------------------------------


def test_a_checkpoint_is_a_header_with_the_payloads_sha256_then_the_payload(tmp_path):
    path = save_checkpoint(tmp_path, {"step": 7, "weights": torch.arange(4.0)})
    assert path.name == "checkpoint-000007.pt"
    header, checksum, payload = path.read_bytes().split(b"\n", 2)
    assert header == f"{CHECKPOINT_FORMAT} {CHECKPOINT_VERSION}".encode()
    assert checksum == f"sha256 {hashlib.sha256(payload).hexdigest()} bytes {len(payload)}".encode()
    state = load_checkpoint(path, required=("step", "weights"))
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def _damage(kind: str, intact: bytes, tmp_path: Path) -> bytes:
    Malicious.marker = tmp_path / "pwned"
    corrupted = bytearray(intact)
    corrupted[len(intact) // 2] ^= 0xFF
    return {
        "truncated to 3000 bytes": intact[:3000],
        "truncated inside the header": intact[:40],
        "100 random bytes": bytes(torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0)).tolist()),
        "one byte flipped": bytes(corrupted),
        "empty": b"",
        "a plain torch.save of something else": _torch_bytes({"weights": torch.ones(3)}),
        "format 1 (a bare torch.save of a training state)": _torch_bytes({"version": 1, "step": 3}),
        "another format version": intact.replace(f"{CHECKPOINT_FORMAT} {CHECKPOINT_VERSION}".encode(),
                                                 f"{CHECKPOINT_FORMAT} 3".encode(), 1),
        "a malicious pickle": _torch_bytes({"step": 1, "payload": Malicious()}),
        "a malicious pickle, header and checksum right": _with_header(_torch_bytes({"payload": Malicious()})),
        "the format around something else": _with_header(_torch_bytes({"weights": torch.ones(3)})),
        "trailing bytes": intact + b"junk",
    }[kind]


@pytest.mark.parametrize("kind, expected", [
    ("truncated to 3000 bytes", "is truncated: "),
    ("truncated inside the header", "is truncated: it ends inside its header"),
    ("100 random bytes", "is not a mixprec checkpoint: it does not begin with 'MIXPREC-CHECKPOINT'"),
    ("one byte flipped", "is corrupted: its payload's sha256 differs from the one in its header"),
    ("empty", "is empty (0 bytes)"),
    ("a plain torch.save of something else", "is a plain torch.save/pickle file, not a mixprec checkpoint"),
    ("format 1 (a bare torch.save of a training state)", "is a plain torch.save/pickle file"),
    ("another format version", "has format version '3'; this mixprec reads version 2"),
    ("a malicious pickle", "is a plain torch.save/pickle file, not a mixprec checkpoint"),
    ("a malicious pickle, header and checksum right",
     "holds objects other than tensors and plain data; refused to unpickle them (weights_only): "),
    ("the format around something else", "lacks recipe, policy, seed, steps, step, model, optimizer"),
    ("trailing bytes", "is corrupted: 4 bytes more than the"),
])
def test_a_damaged_or_foreign_file_is_one_line_naming_it_and_what_is_wrong(kind, expected, intact, tmp_path):
    path = tmp_path / "checkpoint-000006.pt"
    path.write_bytes(_damage(kind, intact, tmp_path))
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint '{path}' ") and expected in message
    assert "\n" not in message and len(message) < 400
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled beyond weights_only


def test_a_missing_checkpoint_is_named():
    with pytest.raises(ValueError, match="checkpoint '/nonexistent/checkpoint-000001.pt' does not exist"):
        load_checkpoint(Path("/nonexistent/checkpoint-000001.pt"))


# ----- rotation and temporary files ----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_the_newest_keep_checkpoints_are_kept(keep, tmp_path):
    _run(tmp_path, checkpoint_every=1, keep=keep)
    assert [s for s, _ in list_checkpoints(tmp_path)] == list(range(7 - keep, 7))
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind


def test_keep_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1 \\(checkpoints kept in out\\), got 0"):
        _run(tmp_path, keep=0)


def test_saving_a_step_removes_checkpoints_of_later_steps_left_by_an_interrupted_attempt(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, {"step": step}, keep=5)
    save_checkpoint(tmp_path, {"step": 3}, keep=2)  # a resume from step 2 redoing step 3
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_stale_temporary_files_are_removed_when_a_run_starts_or_resumes(tmp_path):
    _run(tmp_path, stop_at=3)
    stale = [tmp_path / ".checkpoint-000004.pt.x1y2.tmp", tmp_path / ".metrics.jsonl.abc.tmp",
             tmp_path / ".result.json.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    (tmp_path / "notes.tmp").write_text("the user's")  # not mixprec's: stays
    _run(tmp_path, resume=True)
    assert not any(path.exists() for path in stale) and (tmp_path / "notes.tmp").exists()


# ----- resuming from the newest intact checkpoint -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated to 3000 bytes", "100 random bytes", "one byte flipped",
                                  "a malicious pickle, header and checksum right"])
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_as_an_uninterrupted_run(kind, tmp_path):
    whole = _run(tmp_path / "whole")
    part = tmp_path / "part"
    _run(part, stop_at=4, checkpoint_every=2)  # checkpoints 2 and 4
    newest = list_checkpoints(part)[-1][1]
    newest.write_bytes(_damage(kind, newest.read_bytes(), tmp_path))
    with pytest.warns(UserWarning) as caught:
        resumed = _run(part, resume=True)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"checkpoint '{newest}' ") and "resuming from an older checkpoint" in message
    assert resumed.history == whole.history and resumed.final_metric == whole.final_metric
    assert not (tmp_path / "pwned").exists()


def test_resume_with_no_intact_checkpoint_names_every_file_and_why(tmp_path):
    _run(tmp_path, stop_at=4, checkpoint_every=2)
    (tmp_path / "checkpoint-000004.pt").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint-000002.pt").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        _run(tmp_path, resume=True)
    message = str(error.value)
    assert message.startswith(f"no intact checkpoint to resume from in '{tmp_path}': checkpoint '")
    assert "checkpoint-000004.pt' is not a mixprec checkpoint" in message
    assert "checkpoint-000002.pt' is empty (0 bytes)" in message and "--overwrite" in message
    assert "\n" not in message


def test_find_checkpoint_returns_the_newest_intact_one_and_what_it_skipped(tmp_path):
    _run(tmp_path, steps=3, checkpoint_every=1, keep=3)
    (tmp_path / "checkpoint-000003.pt").write_bytes(b"\x00" * 10)
    path, state, skipped = find_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-000002.pt" and state["step"] == 2
    assert skipped == [f"checkpoint '{tmp_path / 'checkpoint-000003.pt'}' is not a mixprec checkpoint: it does "
                       "not begin with 'MIXPREC-CHECKPOINT' (random or overwritten bytes?)"]


def test_the_checkpoint_history_holds_every_record_up_to_its_step(tmp_path):
    # Losses are read back every LOG_EVERY steps; a checkpoint between two reads used to lack the steps
    # since the last one. Each checkpoint's history is the run's, up to its step.
    whole = _run(tmp_path / "whole", steps=LOG_EVERY + 5)
    _run(tmp_path / "part", steps=LOG_EVERY + 5, checkpoint_every=3, keep=LOG_EVERY)
    for step, path in list_checkpoints(tmp_path / "part"):
        history = load_checkpoint(path)["history"]
        assert history == [r for r in whole.history if r["step"] <= step], step
        assert [r["step"] for r in history if r["kind"] == "step"] == list(range(1, step + 1))


# ----- run folders -----------------------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    first = _run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError) as error:
        _run(tmp_path, seed=1)
    assert str(error.value) == (
        f"output folder '{tmp_path}' already holds a run (checkpoint-000006.pt); pass resume=True to continue "
        "it, overwrite=True to start it again, or another out=")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    again = _run(tmp_path, seed=1, overwrite=True)
    assert again.history != first.history and (tmp_path / "notes.txt").read_text() == "mine"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]


def test_a_folder_with_logs_but_no_checkpoint_says_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "metric": 1.0}\n')
    with pytest.raises(ValueError, match="already holds a run \\(metrics.jsonl\\) but no checkpoint to resume "
                                         "from; pass overwrite=True to start it again, or another out="):
        _run(tmp_path)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="continues the run in the folder and overwrite=True replaces it"):
        prepare_run_folder(tmp_path, resume=True, overwrite=True)


def test_overwrite_removes_only_mixprecs_files(tmp_path):
    names = ["metrics.jsonl", "result.json", "checkpoint.pt", "checkpoint-000010.pt",
             "events.out.tfevents.1.host.2.0", ".checkpoint-000011.pt.abc.tmp"]
    kept = ["notes.txt", "checkpoint-final.pt", "metrics.jsonl.bak", "model.pt"]
    for name in names + kept:
        (tmp_path / name).write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_run_folder(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
