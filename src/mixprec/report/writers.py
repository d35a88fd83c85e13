"""Files a run leaves behind: metrics.jsonl, TensorBoard event files, and JSON results.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with RunLogger(folder, tensorboard=False) as log:
    ...     log({"kind": "step", "step": 1, "loss": 2.5})
    >>> (folder / "metrics.jsonl").read_text()
    '{"kind": "step", "step": 1, "loss": 2.5}\\n'
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


def clean_json(value: Any) -> Any:
    """``value`` with NaN/inf floats as None, so files are strict JSON (a diverged run has NaN losses)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented strict JSON, atomically (temp file + os.replace), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(Path(path), json.dumps(clean_json(value), indent=2, allow_nan=False) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in its folder and os.replace: a kill leaves the
    old file or the new one, never a part (and at worst a ``.NAME.*.tmp`` file, which the next run in a
    run folder removes)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's is 0o600
        os.replace(tmp, path)
    except OSError as error:  # a full disk, say: the old file stays whole, the temporary one goes
        Path(tmp).unlink(missing_ok=True)
        raise named(error, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def named(error: OSError, path: Path | str) -> OSError:
    """``error`` naming the file it failed to write (a failed ``write`` names none), for a one-line message."""
    return error if error.filename is not None else OSError(error.errno, error.strerror, str(path))


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(clean_json(record)) + "\n"


class RunLogger:
    """Writes a run's records to ``folder/metrics.jsonl`` and a TensorBoard event file in ``folder``.

    Pass it as ``log=`` to `mixprec.harness.training.train`. The folder's logs are this run's alone: at the
    start, metrics.jsonl is rewritten (atomically) to hold exactly ``history`` and the folder's old
    TensorBoard event files are replaced by one holding ``history``. For a resumed run, pass the
    checkpoint's history (every record up to its step): what the interrupted run logged after it, or
    a line torn by a kill, is dropped without being read, and the files read like an uninterrupted
    run's. Every record is written through to the file as it comes (a line at a time).
    """

    def __init__(self, folder: Path | str, history: list[dict[str, Any]] | None = None,
                 tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        history = history or []
        _write_atomically(self.folder / METRICS_NAME, "".join(_json_line(r) for r in history))
        # Unbuffered bytes: each record is one write, and one that fails (a full disk) is cut off again.
        self._file = (self.folder / METRICS_NAME).open("ab", buffering=0)
        self._writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Old event files go first: a kill before the new one is whole loses nothing that the next
            # resume does not write again from its checkpoint's history.
            for old in self.folder.glob("events.out.tfevents.*"):
                old.unlink(missing_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.folder))
            for record in history:
                self._add_scalars(record)

    def __call__(self, record: dict[str, Any]) -> None:
        line, end = _json_line(record).encode(), self._file.tell()
        try:
            if self._file.write(line) != len(line):  # a short write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:  # no torn line is left: the file ends with the last whole record
            with contextlib.suppress(OSError):
                self._file.truncate(end)
            raise named(error, self.folder / METRICS_NAME) from None
        try:
            self._add_scalars(record)
        except OSError as error:  # TensorBoard's reader stops at a torn last record; a resume rewrites the file
            raise named(error, self._writer.file_writer.event_writer._file_name) from None

    def _add_scalars(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = record["step"]
        if record["kind"] == "eval":
            self._writer.add_scalar("eval/metric", record["metric"], step)
            return
        for key in ("loss", "loss_scale", "lr", "grad_norm", "skipped_steps"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as error:
                raise named(error, self._writer.file_writer.event_writer._file_name) from None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # closing after a failed write: the first error is the one to tell
            self.close()
