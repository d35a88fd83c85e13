"""PNG plots of a comparison: metric and loss curves per policy, and the loss scale over steps.

Curves are the mean over seeds with the min-max band shaded; losses are smoothed over a few steps
(a running mean) and drawn on a log axis; loss scales on a log2 axis, with skipped steps marked.

Example:
    >>> import tempfile, pathlib
    >>> from mixprec.training import compare
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> [p.name for p in plot_comparison(compare("tiny-updates", ["f32"], steps=5), folder)]
    ['tiny-updates-curves.png', 'tiny-updates-loss-scale.png']
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixprec.training import Comparison

SMOOTH = 10  # steps in the loss's running mean


def plot_comparison(comparison: Comparison, folder: Path) -> list[Path]:
    """Write ``<recipe>-curves.png`` and ``<recipe>-loss-scale.png`` into ``folder``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no window on a desktop
    import matplotlib.pyplot as plt

    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(comparison.policies)}
    paths = [folder / f"{comparison.recipe}-curves.png", folder / f"{comparison.recipe}-loss-scale.png"]

    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for policy in comparison.policies:
        runs = comparison.runs_of(policy)
        steps, values = _aligned([[(r["step"], r["metric"]) for r in run.history if r["kind"] == "eval"]
                                  for run in runs])
        _band(ax_metric, steps, values, colors[policy], policy)
        steps, values = _aligned([[(r["step"], r["loss"]) for r in run.history if r["kind"] == "step"]
                                  for run in runs])
        _band(ax_loss, steps, _running_mean(values, SMOOTH), colors[policy], policy)
    arrow = "higher is better" if comparison.higher_is_better else "lower is better"
    ax_metric.set(title=f"{comparison.recipe}: held-out {comparison.metric} ({arrow})", xlabel="step",
                  ylabel=comparison.metric)
    ax_loss.set(title=f"training loss (running mean of {SMOOTH} steps)", xlabel="step", ylabel="loss")
    if _positive(ax_loss):
        ax_loss.set_yscale("log")
    _legend(ax_metric, comparison)
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    for policy in comparison.policies:
        run = comparison.runs_of(policy)[0]  # the scale trajectory of the first seed
        records = [r for r in run.history if r["kind"] == "step"]
        steps = [r["step"] for r in records]
        ax.step(steps, [r["loss_scale"] for r in records], where="post", color=colors[policy], label=policy)
        skipped = [r for r in records if not r["applied"]]
        if skipped:
            ax.plot([r["step"] for r in skipped], [r["loss_scale"] for r in skipped], "x",
                    color=colors[policy], label=f"{policy}: skipped step")
    ax.set_yscale("log", base=2)
    ax.set(title=f"{comparison.recipe}: loss scale per step (seed {comparison.seeds[0]})", xlabel="step",
           ylabel="loss scale")
    ax.legend(fontsize=8)
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _aligned(series: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a (seeds, steps) array of values, on the steps all runs share."""
    common = sorted(set.intersection(*(set(s for s, _ in run) for run in series)))
    lookup = [dict(run) for run in series]
    values = np.array([[_finite(d[s]) for s in common] for d in lookup], dtype=float)
    return np.array(common), values


def _finite(value: float | None) -> float:
    return math.nan if value is None else value


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    if values.shape[1] < window:
        return values
    kernel = np.ones(window) / window
    smoothed = [np.convolve(row, kernel, mode="full")[: len(row)] for row in values]
    counts = np.minimum(np.arange(1, values.shape[1] + 1), window) / window  # the first steps average fewer
    return np.array(smoothed) / counts


def _band(ax, steps: np.ndarray, values: np.ndarray, color, label: str) -> None:
    ax.plot(steps, np.nanmean(values, axis=0) if len(values) > 1 else values[0], color=color, label=label)
    if len(values) > 1:
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.2,
                        linewidth=0)


def _positive(ax) -> bool:
    data = [line.get_ydata() for line in ax.get_lines()]
    finite = [v for d in data for v in np.asarray(d, dtype=float) if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def _legend(ax, comparison: Comparison) -> None:
    n = len(comparison.seeds)
    ax.legend(title=f"mean of {n} seeds, min-max shaded" if n > 1 else None, fontsize=8, title_fontsize=8)
