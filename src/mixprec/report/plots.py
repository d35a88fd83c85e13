"""PNG plots of a comparison: metric and loss curves per policy, and the loss scale over steps.

Curves are the mean over seeds with the min-max band shaded; losses are smoothed over a few steps
(a running mean) and drawn on a log axis. A third panel shows every seed's final metric against the
reference's min-max band: the parity question at a glance. Loss scales are on a log2 axis, with
skipped steps marked. The reference (f32) is drawn wide and pale underneath, so that a policy that
matches it exactly still shows both lines.

Example:
    >>> import tempfile, pathlib
    >>> from mixprec.harness.training import compare
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> [p.name for p in plot_comparison(compare("tiny-updates", ["f32"], steps=5), folder)]
    ['tiny-updates-curves.png', 'tiny-updates-loss-scale.png']
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from mixprec.harness.training import Comparison

from .summary import reference_policy

SMOOTH = 10  # steps in the loss's running mean


def plot_comparison(comparison: Comparison, folder: Path) -> list[Path]:
    """Write ``<recipe>-curves.png`` and ``<recipe>-loss-scale.png`` into ``folder``; return their paths."""
    # Figures made directly (not through pyplot) draw into files with the Agg canvas and leave the
    # process's backend alone: a notebook keeps its inline plots.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    tab10 = matplotlib.colormaps["tab10"]
    colors = {p: tab10(i % 10) for i, p in enumerate(comparison.policies)}
    reference = reference_policy(comparison)
    paths = [folder / f"{comparison.recipe}-curves.png", folder / f"{comparison.recipe}-loss-scale.png"]

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_metric, ax_loss, ax_final = fig.subplots(1, 3, gridspec_kw={"width_ratios": [4, 4, 2.2]})
    for policy in comparison.policies:
        runs = comparison.runs_of(policy)
        style = _style(policy == reference)
        steps, values = _aligned([[(r["step"], r["metric"]) for r in run.history if r["kind"] == "eval"]
                                  for run in runs])
        _band(ax_metric, steps, values, colors[policy], policy, style)
        steps, values = _aligned([[(r["step"], r["loss"]) for r in run.history if r["kind"] == "step"]
                                  for run in runs])
        _band(ax_loss, steps, _running_mean(values, SMOOTH), colors[policy], policy, style)
    arrow = "higher is better" if comparison.higher_is_better else "lower is better"
    ax_metric.set(title=f"{comparison.recipe}: held-out {comparison.metric} ({arrow})", xlabel="step",
                  ylabel=comparison.metric)
    ax_loss.set(title=f"training loss (running mean of {SMOOTH} steps)", xlabel="step", ylabel="loss")
    if _positive(ax_loss):
        ax_loss.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax_loss.yaxis.set_major_formatter(plain)
        ax_loss.yaxis.set_minor_formatter(plain)
    _legend(ax_metric, comparison)
    _finals(ax_final, comparison, colors, reference)
    fig.savefig(paths[0], dpi=110)

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    for policy in comparison.policies:
        run = comparison.runs_of(policy)[0]  # the scale trajectory of the first seed
        records = [r for r in run.history if r["kind"] == "step"]
        record_steps = [r["step"] for r in records]
        scaled = any(r["loss_scale"] != 1.0 for r in records)
        ax.step(record_steps, [r["loss_scale"] for r in records], where="post", color=colors[policy],
                label=policy + ("" if scaled else " (no scaling)"), **_style(policy == reference))
        skipped = [r for r in records if not r["applied"]]
        if skipped:
            ax.plot([r["step"] for r in skipped], [r["loss_scale"] for r in skipped], "x",
                    color=colors[policy], label=f"{policy}: skipped step")
    ax.set_yscale("log", base=2)
    ax.set(title=f"{comparison.recipe}: loss scale per step (seed {comparison.seeds[0]})", xlabel="step",
           ylabel="loss scale")
    ax.legend(fontsize=8)
    fig.savefig(paths[1], dpi=110)
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


def _style(is_reference: bool) -> dict:
    return {"linewidth": 4, "alpha": 0.45, "zorder": 1} if is_reference else {"linewidth": 1.5, "zorder": 2}


def _band(ax, steps: np.ndarray, values: np.ndarray, color, label: str, style: dict) -> None:
    with warnings.catch_warnings():  # a column that is NaN for every seed (diverged) stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(values, axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    ax.plot(steps, mean, color=color, label=label, **style)
    if len(values) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)


def _finals(ax, comparison: Comparison, colors: dict, reference: str) -> None:
    """Each seed's final metric per policy (dots), the mean (a bar), the reference's min-max (shaded)."""
    ref = [r.final_metric for r in comparison.runs_of(reference)]
    if all(math.isfinite(v) for v in ref):
        ax.axhspan(min(ref), max(ref), color=colors[reference], alpha=0.15, linewidth=0,
                   label=f"{reference} min-max")
    for i, policy in enumerate(comparison.policies):
        finals = [r.final_metric for r in comparison.runs_of(policy)]
        finite = [v for v in finals if math.isfinite(v)]
        ax.plot([i] * len(finite), finite, "o", color=colors[policy], alpha=0.8)
        if finite:
            ax.plot([i - 0.25, i + 0.25], [np.mean(finite)] * 2, color=colors[policy], linewidth=2)
    ax.set_xticks(range(len(comparison.policies)), comparison.policies, rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(comparison.policies) - 0.4)
    ax.set(title=f"final {comparison.metric} per seed", ylabel=comparison.metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _positive(ax) -> bool:
    data = [line.get_ydata() for line in ax.get_lines()]
    finite = [v for d in data for v in np.asarray(d, dtype=float) if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def _legend(ax, comparison: Comparison) -> None:
    n = len(comparison.seeds)
    ax.legend(title=f"mean of {n} seeds, min-max shaded" if n > 1 else None, fontsize=8, title_fontsize=8)
