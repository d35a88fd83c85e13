"""Reports of training runs: tables, plots, JSON, TensorBoard, and a report.md that ties them together.

Example:
    >>> import tempfile, pathlib
    >>> from mixprec.harness.training import compare
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = write_report([compare("tiny-updates", ["f32", "f16-pure"], steps=5)], folder)
    >>> sorted(p.name for p in folder.iterdir())[:2]
    ['report.md', 'results.json']
"""

from __future__ import annotations

from pathlib import Path

from mixprec.harness.environment import environment, git_commit
from mixprec.harness.training import Comparison

from .markdown import report_markdown
from .plots import plot_comparison
from .progress import TrainingProgress
from .summary import (
    Verdict,
    format_bytes,
    format_metric,
    format_scale,
    reference_policy,
    short_policy,
    summarize,
    verdict_sentence,
    verdicts,
    wrap_policy,
)
from .tables import markdown_tables, memory_table, render, results_table
from .writers import RunLogger, clean_json, write_json


def write_report(comparisons: list[Comparison], folder: Path | str, *, device: str = "cpu",
                 threads: int | None = None, title: str = "mixprec comparison", extra: dict | None = None) -> Path:
    """Write results.json, the PNG plots and report.md for ``comparisons`` into ``folder``.

    Returns the path of report.md.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(device, threads)
    plots = {c.recipe: plot_comparison(c, folder) for c in comparisons}
    experiments = []
    for c in comparisons:
        entry = c.to_dict()
        entry["summary"] = summarize(c)
        entry["reference"] = reference_policy(c)
        experiments.append(entry)
    write_json(folder / "results.json", {"environment": env, **(extra or {}), "experiments": experiments})
    path = folder / "report.md"
    path.write_text(report_markdown(comparisons, plots, env, title))
    return path


__all__ = [
    "RunLogger", "TrainingProgress", "Verdict", "clean_json", "environment", "format_bytes", "format_metric",
    "format_scale", "git_commit", "markdown_tables", "memory_table", "plot_comparison", "reference_policy", "render",
    "report_markdown", "results_table", "short_policy", "summarize", "verdict_sentence", "verdicts", "wrap_policy",
    "write_json", "write_report",
]
