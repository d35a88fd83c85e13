"""Checkpoints, run folders and random state for the reference training loop.

**Checkpoint files.** A run folder keeps its last ``keep`` checkpoints (default 2), one file per
step, named for it: ``checkpoint-000100.pt``. Each file is a two-line header and a payload:

    MIXPREC-CHECKPOINT 2
    sha256 <64 hex digits> bytes <n>
    <n bytes: torch.save of the state dict>

The header names the format and its version; the sha256 of the payload tells a truncated or
corrupted file from an intact one before anything is unpickled; the payload is read with
``torch.load(weights_only=True)`` only (tensors and plain data: a malicious pickle is refused).

Writing (`save_checkpoint`): a temporary ``.checkpoint-000100.pt.XXXX.tmp`` in the folder, fsync,
``os.replace`` onto the final name, then the rotation removes the checkpoints older than the newest
``keep`` (and any with a later step, left by an attempt that was interrupted and is being redone),
only those it can read: one it cannot (another format version, damaged) is never removed nor replaced.
A kill at any moment leaves every earlier checkpoint intact; at worst a temporary file, removed later.

Reading: `load_checkpoint` raises a one-line ValueError naming the file and what is wrong with it
(missing, not a file, empty, not a mixprec checkpoint, another format version, truncated, corrupted,
refused pickle, missing keys); `find_checkpoint` returns the newest intact checkpoint whose contents fit
the run (`mixprec.harness.validation`) and the files it skipped, with why. A folder with a checkpoint's
name is none: skipped, never removed (set aside if a checkpoint of its step is written).

**Run folders.** `check_run_folder` refuses a folder that holds a run (metrics.jsonl, checkpoints,
result.json, TensorBoard event files) unless asked to resume or overwrite it, removes temporary files
killed runs left, and returns the files an overwrite removes, once the new run is set up.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> path = save_checkpoint(folder, {"step": 3, "weights": torch.ones(2)})
    >>> path.name, load_checkpoint(path, required=("step",))["step"]
    ('checkpoint-000003.pt', 3)
    >>> _ = path.write_bytes(path.read_bytes()[:60])
    >>> load_checkpoint(path)
    Traceback (most recent call last):
    ValueError: checkpoint '.../checkpoint-000003.pt' is truncated: ...
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mixprec.harness.processes import LOCK_TEMP_PATTERN

CHECKPOINT_FORMAT = "MIXPREC-CHECKPOINT"
CHECKPOINT_VERSION = 2  # 1: a bare torch.save in checkpoint.pt (no header, no checksum, one file kept)
DEFAULT_KEEP = 2  # checkpoints kept in a run folder: a damaged newest one still leaves one to resume from
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pt")
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # format 1: recognised as a run's file, never resumed from

#: what a checkpoint must hold (`load_checkpoint` checks); also "faults", "max_skips_in_a_row" (older lack them)
CHECKPOINT_KEYS = ("recipe", "policy", "seed", "steps", "step", "model", "optimizer", "scaler", "scheduler",
                   "rng", "history", "train_seconds")

#: the files a run writes into its folder (the CLI's metrics.jsonl, result.json and TensorBoard events
#: included): what makes a folder hold a run, and all that overwriting it removes
RUN_FILE_PATTERNS = ("metrics.jsonl", "result.json", LEGACY_CHECKPOINT_NAME, "checkpoint-*.pt",
                     "events.out.tfevents.*")
#: temporary files of atomic writes (checkpoints, metrics.jsonl, result.json) that a kill can leave behind
TEMP_FILE_PATTERNS = (".checkpoint*.tmp", ".metrics.jsonl.*.tmp", ".result.json.*.tmp", LOCK_TEMP_PATTERN)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any training.

    Raises ValueError with the reason (so the CLI prints one line instead of failing at the end).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write to output folder {str(folder)!r}: {error.strerror or error}; "
            "choose another with --out"
        ) from None


# ----- checkpoint files -----------------------------------------------------------------------------


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``: ``checkpoint-000100.pt``."""
    return Path(folder) / f"checkpoint-{step:06d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The (step, path) of every checkpoint file in ``folder``, oldest first (intact or not). Only files: a
    folder (or pipe, ...) with a checkpoint's name is not a checkpoint (`not_checkpoints` names them)."""
    found = []
    for path in Path(folder).glob("checkpoint-*.pt"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def not_checkpoints(folder: Path) -> list[str]:
    """One line per thing in ``folder`` with a checkpoint's name that is not a file (a directory, say): what
    it is, and that it is skipped and kept (`list_checkpoints` leaves it out; nothing removes it)."""
    return [f"{str(path)!r} has a checkpoint's name but is {_kind_of(path)}, not a file: it is not a checkpoint, "
            "so it is skipped (it stays in the folder)" for path in sorted(Path(folder).glob("checkpoint-*.pt"))
            if CHECKPOINT_PATTERN.fullmatch(path.name) and not path.is_file()]


def _kind_of(path: Path) -> str:
    """'a directory', 'a named pipe', ... : what the non-file ``path`` is."""
    kinds = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a broken symbolic link", stat.S_IFIFO: "a named pipe"}
    return kinds.get(stat.S_IFMT(path.lstat().st_mode), "not a regular file")


def save_checkpoint(folder: Path, state: dict[str, Any], keep: int = DEFAULT_KEEP,
                    readable: dict[str, bool] | None = None) -> Path:
    """Write ``state`` (tensors and plain data, with an int ``"step"``) as ``folder``'s checkpoint of that
    step, atomically, then keep only the newest ``keep`` checkpoints up to it. Returns its path.

    The temporary file is fsynced before os.replace puts it in place, and the folder after, so the new
    checkpoint exists whole or not at all; only then are older ones removed, those `load_checkpoint`
    reads (``readable``: file name -> whether it does, filled in: pass one dict to read each file once).
    """
    readable = {} if readable is None else readable
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints kept in the run folder), got {keep}")
    folder = Path(folder)
    step = int(state["step"])
    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = (f"{CHECKPOINT_FORMAT} {CHECKPOINT_VERSION}\n"
              f"sha256 {hashlib.sha256(payload).hexdigest()} bytes {len(payload)}\n").encode()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if os.path.lexists(path) and not path.is_file():
            _set_aside(path, f"is {_kind_of(path)}, not a checkpoint")  # a folder in the way: kept, not replaced
        elif path.exists() and not _can_read(path, readable):
            _set_aside(path, "cannot be read")  # a file of the same step this mixprec cannot read is kept, not replaced
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    _rotate(folder, step, keep, readable)
    return path


def _rotate(folder: Path, step: int, keep: int, readable: dict[str, bool]) -> None:
    """Remove the checkpoints before the newest ``keep`` up to ``step``, and those of later steps (an attempt's
    being redone), only files this mixprec reads: one it cannot (a newer format, damaged) is kept, uncounted."""
    readable[checkpoint_path(folder, step).name] = True
    found = list_checkpoints(folder)
    later = [p for s, p in found if s > step and _can_read(p, readable)]
    older = [p for s, p in reversed(found) if s < step and _can_read(p, readable)][keep - 1:]
    for stale in later + older:
        stale.unlink(missing_ok=True)
        readable.pop(stale.name, None)


def _can_read(path: Path, readable: dict[str, bool]) -> bool:
    """Whether `load_checkpoint` reads ``path`` (asked once: the answer is kept in ``readable``)."""
    if path.name not in readable:
        try:
            load_checkpoint(path, required=())
            readable[path.name] = True
        except ValueError:
            readable[path.name] = False
    return readable[path.name]


def _set_aside(path: Path, problem: str) -> None:
    """Rename the unreadable checkpoint ``path`` to ``<name>.unreadable`` (never over a file), and say so."""
    kept = path.with_name(f"{path.name}.unreadable")
    kept = kept.with_name(f"{path.name}.{os.urandom(3).hex()}.unreadable") if kept.exists() else kept
    os.rename(path, kept)
    warnings.warn(f"checkpoint {str(path)!r} {problem}, so this run's checkpoint of the same step does not "
                  f"replace it: it is kept as {kept.name!r}", stacklevel=3)


def load_checkpoint(path: Path, required: Iterable[str] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: header, length and sha256 checked, then the
    payload unpickled with ``torch.load(weights_only=True)`` (tensors and plain data only).

    Raises a one-line ValueError naming the file and what is wrong: missing, unreadable, empty, not a
    mixprec checkpoint (e.g. a plain torch.save), another format version, truncated, corrupted, holding
    objects weights_only refuses, or lacking one of the ``required`` keys.
    """
    path = Path(path)
    state = _unpickle(path, _checked_payload(path, _read_bytes(path)))
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise _bad(path, f"lacks {', '.join(missing)}: it is not a checkpoint of mixprec's training loop")
    return state


def _bad(path: Path, problem: str) -> ValueError:
    """The one-line error `load_checkpoint` raises: the file, and what is wrong with it."""
    return ValueError(f"checkpoint {str(path)!r} {problem}")


def _read_bytes(path: Path) -> bytes:
    """The bytes of the checkpoint file ``path``; `_bad` if it is missing, unreadable or empty."""
    if os.path.lexists(path) and not path.is_file():  # never read: a named pipe would block
        raise _bad(path, f"is {_kind_of(path)}, not a checkpoint file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _bad(path, "does not exist") from None
    except OSError as error:
        raise _bad(path, f"cannot be read: {error.strerror or error}") from None
    if not data:
        raise _bad(path, "is empty (0 bytes)")
    return data


def _check_magic(path: Path, data: bytes) -> None:
    """`_bad` unless ``data`` begins with the checkpoint header's first word, saying what it is instead."""
    magic = CHECKPOINT_FORMAT.encode()
    if data.startswith(magic):
        return
    if magic.startswith(data):
        raise _bad(path, f"is truncated: it ends inside its header, after {len(data)} bytes")
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\x80"):
        raise _bad(path, f"is a plain torch.save/pickle file, not a mixprec checkpoint (no {CHECKPOINT_FORMAT} "
                         f"header): written by another program, or by a mixprec older than format "
                         f"{CHECKPOINT_VERSION}")
    raise _bad(path, f"is not a mixprec checkpoint: it does not begin with {CHECKPOINT_FORMAT!r} "
                     f"(random or overwritten bytes?)")


def _checked_payload(path: Path, data: bytes) -> bytes:
    """The payload of the checkpoint file's bytes ``data``, after its header: format and version, then
    the payload's length and sha256 checked against the header's; `_bad` for the first that is wrong."""
    _check_magic(path, data)
    lines = data.split(b"\n", 2)
    if len(lines) < 3:
        raise _bad(path, f"is truncated: it ends inside its header, after {len(data)} bytes")
    first, second, payload = lines
    version = first[len(CHECKPOINT_FORMAT):].strip().decode("ascii", "replace")
    if version != str(CHECKPOINT_VERSION):
        raise _bad(path, f"has format version {version!r}; this mixprec reads version {CHECKPOINT_VERSION}")
    match = re.fullmatch(rb"sha256 ([0-9a-f]{64}) bytes (\d+)", second)
    if match is None:
        raise _bad(path, "has a damaged header: its second line should read 'sha256 <64 hex digits> bytes <n>'")
    digest, size = match.group(1).decode(), int(match.group(2))
    if len(payload) < size:
        raise _bad(path, f"is truncated: {len(payload)} of its {size} payload bytes (the file was cut short)")
    if len(payload) > size:
        raise _bad(path, f"is corrupted: {len(payload) - size} bytes more than the {size} its header declares")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _bad(path, "is corrupted: its payload's sha256 differs from the one in its header")
    return payload


def _unpickle(path: Path, payload: bytes) -> Any:
    """``torch.load(weights_only=True)`` of a checked payload; `_bad` if it refuses or cannot unpack it."""
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _bad(path, f"holds objects other than tensors and plain data; refused to unpickle them "
                         f"(weights_only): {_reason(error)}") from None
    except Exception as error:  # torch's reader raises RuntimeError and others for a bad archive
        raise _bad(path, f"cannot be unpacked by torch.load: {_reason(error)}") from None


def find_checkpoint(folder: Path, check: Callable[[dict[str, Any], Path], None] | None = None
                    ) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest intact checkpoint in ``folder``: (path, state, skipped), where ``skipped`` holds one
    line per newer file that could not be read, saying which and why (`load_checkpoint`'s message), or
    whose contents ``check(state, path)`` refused (its ValueError's message; see `mixprec.harness.validation`).

    Raises ValueError if there is no checkpoint, or none is intact (every file named, with why).
    """
    folder = Path(folder)
    candidates = [p for _, p in reversed(list_checkpoints(folder))]
    if (folder / LEGACY_CHECKPOINT_NAME).exists():
        candidates.append(folder / LEGACY_CHECKPOINT_NAME)  # only to say why it cannot be resumed
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(state, path)
            return path, state, skipped
        except ValueError as error:
            skipped.append(str(error))
    if not skipped:
        raise ValueError(f"no checkpoint to resume from in {str(folder)!r}: start the run without resume first")
    newer = any("' has format version '" in r for r in skipped) * "; resume with the mixprec of that format version"
    raise ValueError(f"no intact checkpoint to resume from in {str(folder)!r}: {'; '.join(skipped)}. Nothing was "
                     f"changed (a checkpoint mixprec cannot read is never deleted){newer}; to keep these files, start "
                     "the run in another folder (--out, out=), or again here with --overwrite (overwrite=True), which "
                     "deletes them")


def _reason(error: BaseException) -> str:
    """The informative line of a (torch) error message, which can run to many lines of advice."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "WeightsUnpickler")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)] or lines or [type(error).__name__]
    return useful[0][:200]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not needed against kills, only against power loss)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----- run folders ---------------------------------------------------------------------------------------


def run_files(folder: Path) -> list[Path]:
    """The files of a run in ``folder`` (see RUN_FILE_PATTERNS), sorted; [] if it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in RUN_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(p for p in found if not p.name.startswith("checkpoint-") or CHECKPOINT_PATTERN.fullmatch(p.name))


def remove_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that killed runs left in ``folder`` (see TEMP_FILE_PATTERNS)."""
    removed = []
    for pattern in TEMP_FILE_PATTERNS:
        for path in Path(folder).glob(pattern):
            if not path.is_file():  # a folder with a temporary file's name is none of mixprec's: left alone
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def prepare_run_folder(folder: Path, *, resume: bool, overwrite: bool, cli: bool = False) -> None:
    """`check_run_folder`, then remove the files an overwrite replaces at once."""
    for path in check_run_folder(folder, resume=resume, overwrite=overwrite, cli=cli):
        path.unlink(missing_ok=True)


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool, cli: bool = False) -> list[Path]:
    """Check ``folder`` can take a run: refuse one that holds a run unless ``resume`` (continue it) or
    ``overwrite``; remove stale temporary files. Returns the run files an overwrite is to remove (only
    those mixprec writes; [] otherwise): the caller removes them when the new run is ready to start.

    ``cli`` words the advice with the command line's options instead of train()'s arguments.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "metrics.jsonl").write_text("")
        >>> check_run_folder(folder, resume=False, overwrite=False)
        Traceback (most recent call last):
        ValueError: output folder '...' already holds a run (metrics.jsonl) but no checkpoint to resume ...
    """
    resume_opt, overwrite_opt, out_opt = ("--resume", "--overwrite", "--out") if cli else (
        "resume=True", "overwrite=True", "out=")
    if resume and overwrite:
        raise ValueError(f"{resume_opt} continues the run in the folder and {overwrite_opt} replaces it: "
                         "pass one of them")
    folder = Path(folder)
    remove_temp_files(folder)
    files = run_files(folder)
    if resume or not files:
        return []
    if not overwrite:
        names = ", ".join(sorted({p.name for p in files if not p.name.startswith("events.")})
                          + ["TensorBoard events"] * any(p.name.startswith("events.") for p in files))
        if list_checkpoints(folder):
            advice = f"; pass {resume_opt} to continue it, {overwrite_opt} to start it again, or another {out_opt}"
        else:
            advice = f" but no checkpoint to resume from; pass {overwrite_opt} to start it again, or another {out_opt}"
        raise ValueError(f"output folder {str(folder)!r} already holds a run ({names}){advice}")
    return files
