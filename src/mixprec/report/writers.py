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
    """Write ``value`` as indented strict JSON, atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(clean_json(value), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


class RunLogger:
    """Appends a run's records to ``folder/metrics.jsonl`` and TensorBoard event files in ``folder``.

    Pass it as ``log=`` to `mixprec.training.train`. With ``resume_step=k`` it first drops what the
    interrupted run logged after step k (the checkpoint's step), so a resumed run's files read like
    an uninterrupted run's.
    """

    def __init__(self, folder: Path | str, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / METRICS_NAME
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self._file = path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge)

    def __call__(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(clean_json(record)) + "\n")
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
            self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
