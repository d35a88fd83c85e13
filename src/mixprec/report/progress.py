"""A live progress bar for training runs (rich), fed with the records `mixprec.harness.training.train` logs.

Example:
    >>> with TrainingProgress(enabled=False) as progress:
    ...     task = progress.add("f32 seed 0", total=10)
    ...     progress.update(task, {"kind": "step", "step": 1, "loss": 2.0, "loss_scale": 1.0})
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from .summary import format_scale


class TrainingProgress:
    """One bar per run: steps done, latest loss, loss scale and last evaluated metric."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self._progress = Progress(
            # Fits 80 columns with the longest preset name: policy, bar, steps, loss/scale/metric, time left.
            TextColumn("{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
            console=console, disable=not enabled,
        )
        self._loss: dict[int, str] = {}  # task -> "loss 2.31 scale 2^16"
        self._metric: dict[int, str] = {}  # task -> " metric 0.97"

    def add(self, description: str, total: int, completed: int = 0) -> int:
        """A new bar; the number `update` takes for it."""
        return self._progress.add_task(description, total=total, completed=completed, status="")

    def update(self, task: int, record: dict[str, Any]) -> None:
        """Show one record of `mixprec.harness.training.train`'s log: a step's loss and scale, or an evaluation."""
        bar = TaskID(task)  # rich's name for the number `add` returned
        if record["kind"] == "eval":
            self._metric[task] = f" metric {record['metric']:.3g}"
        else:
            loss = record["loss"]
            self._loss[task] = (f"loss {loss:.3g}" if math.isfinite(loss) else "loss nan") + \
                f" scale {format_scale(record['loss_scale'])}"
            self._progress.update(bar, completed=record["step"])
        self._progress.update(bar, status=self._loss.get(task, "") + self._metric.get(task, ""))

    def __enter__(self) -> TrainingProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
