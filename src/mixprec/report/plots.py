"""PNG plots of a comparison: metric and loss curves per policy, and the loss scale over steps.

Curves are the mean over seeds with the min-max band shaded; losses are smoothed over a few steps
(a running mean) and drawn on a log axis. A third panel shows every seed's final metric against the
reference's min-max band: the parity question at a glance. Loss scales are on a log2 axis, with
skipped steps marked.

Policies that agree must still be told apart: each has its own colour, line style and marker (markers
staggered along the curve), the reference (f32) is drawn wide and pale underneath, and a policy whose
curves lie on top of another's to the eye says so in the legend ("overlaps f32"). Policies are named
by their shortest form (`short_policy`: a preset and the keys that differ), broken after commas; the
legend sits below the axes, outside them, so it never covers a curve.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixprec.harness.training import Comparison

from .summary import reference_policy, short_policy, wrap_policy

if TYPE_CHECKING:  # matplotlib loads when a plot is drawn, not when the report package is imported
    from matplotlib.figure import Figure

SMOOTH = 10  # steps in the loss's running mean
LINE_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LABEL_WIDTH = 36  # characters a legend label's line may take before it breaks after a comma
TICK_WIDTH = 16  # the same for the final-metric panel's tick labels
COINCIDE = 0.01  # curves closer than this share of the axes' height at every point lie on top of each other
FONT = 8  # points, legend and tick labels
DPI = 110


@dataclass(frozen=True)
class Look:
    """How one policy is drawn: the same in every panel and in the legend."""

    label: str
    color: Any
    reference: bool
    linestyle: Any = "-"
    marker: str = ""

    def line(self, n_points: int = 0, index: int = 0, count: int = 1) -> dict[str, Any]:
        """Keyword arguments of ``ax.plot`` for a curve of ``n_points`` (markers staggered by ``index``)."""
        if self.reference:
            return {"color": self.color, "linewidth": 4, "alpha": 0.45, "zorder": 1, "solid_capstyle": "butt"}
        every = max(1, n_points // 6)
        return {"color": self.color, "linewidth": 1.5, "zorder": 2, "linestyle": self.linestyle,
                "marker": self.marker, "markersize": 5, "markerfacecolor": "none",
                "markevery": (min(index * every // max(count, 1), max(n_points - 1, 0)), every)}


def looks(comparison: Comparison) -> dict[str, Look]:
    """Each policy's colour, line style, marker and legend label (its shortest form, wrapped)."""
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"]
    reference = reference_policy(comparison)
    found = {}
    for i, policy in enumerate(comparison.policies):
        label = wrap_policy(short_policy(policy), LABEL_WIDTH)
        found[policy] = Look(label, tab10(i % 10), policy == reference, LINE_STYLES[i % len(LINE_STYLES)],
                             MARKERS[i % len(MARKERS)])
    return found


def plot_comparison(comparison: Comparison, folder: Path) -> list[Path]:
    """Write ``<recipe>-curves.png`` and ``<recipe>-loss-scale.png`` into ``folder``; return their paths."""
    paths = [folder / f"{comparison.recipe}-curves.png", folder / f"{comparison.recipe}-loss-scale.png"]
    for figure, path in zip((curves_figure(comparison), loss_scale_figure(comparison)), paths, strict=True):
        figure.savefig(path, dpi=DPI)
    return paths


def curves_figure(comparison: Comparison) -> Figure:
    """The metric and loss curves and the final metric per seed, side by side, legend below."""
    # Figures made directly (not through pyplot) draw into files with the Agg canvas and leave the
    # process's backend alone: a notebook keeps its inline plots.
    from matplotlib.figure import Figure

    styles = looks(comparison)
    reference = reference_policy(comparison)
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    n = len(comparison.seeds)
    fig.suptitle(f"{comparison.recipe}: {n} seed{'s' * (n > 1)}, reference {short_policy(reference)}"
                 + (", mean of the seeds with their min-max shaded" if n > 1 else ""), fontsize=11)
    final_width = max(2.4, 0.55 * len(comparison.policies))  # room for every policy's tick label
    ax_metric, ax_loss, ax_final = fig.subplots(1, 3, gridspec_kw={"width_ratios": [4, 4, final_width]})
    drawn: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i, policy in enumerate(comparison.policies):
        runs = comparison.runs_of(policy)
        metric = _aligned([[(r["step"], r["metric"]) for r in run.history if r["kind"] == "eval"] for run in runs])
        loss = _aligned([[(r["step"], r["loss"]) for r in run.history if r["kind"] == "step"] for run in runs])
        loss = (loss[0], _running_mean(loss[1], SMOOTH))
        look, count = styles[policy], len(comparison.policies)
        drawn[policy] = [_band(ax_metric, *metric, look, i, count), _band(ax_loss, *loss, look, i, count)]
    arrow = "higher is better" if comparison.higher_is_better else "lower is better"
    ax_metric.set(title=f"held-out {comparison.metric} ({arrow})", xlabel="step", ylabel=comparison.metric)
    ax_loss.set(title=f"training loss (running mean of {SMOOTH} steps)", xlabel="step", ylabel="loss")
    if _positive(ax_loss):
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(plain_log_formatter())
        ax_loss.yaxis.set_minor_formatter(plain_log_formatter(minor_thresholds=(1, 0.4)))
    styles = _mark_overlaps(styles, drawn, [ax_metric, ax_loss])
    band = _finals(ax_final, comparison, styles, reference)
    handles = [_handle(s) for s in styles.values()] + ([band] if band is not None else [])
    labels = [s.label for s in styles.values()] + ([f"{short_policy(reference)} min-max"] if band is not None else [])
    ncols, rows = _legend_shape(labels, width=15)
    fig.set_size_inches(15, 4.4 + 0.16 * rows + _final_ticks(comparison)[1])  # the legend and upright ticks
    _figure_legend(fig, handles, labels, ncols)
    for ax in (ax_metric, ax_loss):
        ax.tick_params(labelsize=FONT)
    ax_final.tick_params(axis="y", labelsize=FONT)
    return fig


def loss_scale_figure(comparison: Comparison) -> Figure:
    """The loss scale per step of each policy's first seed, skipped steps marked, legend below."""
    from matplotlib.figure import Figure

    styles = looks(comparison)
    trajectories = {}
    for policy in comparison.policies:
        records = [r for r in comparison.runs_of(policy)[0].history if r["kind"] == "step"]  # the first seed
        trajectories[policy] = records
        notes = []
        if not any(r["loss_scale"] != 1.0 for r in records):
            notes.append("no scaling")
        skipped = sum(not r["applied"] for r in records)
        if skipped:
            notes.append(f"x: {skipped} skipped step{'s' * (skipped > 1)}")
        same = next((q for q in trajectories if q != policy and _same_scales(trajectories[q], records)), None)
        if same is not None:
            notes.append(f"overlaps {short_policy(same)}")
        if notes:
            styles[policy] = replace(styles[policy], label=styles[policy].label + "\n(" + "; ".join(notes) + ")")
    ncols, rows = _legend_shape([s.label for s in styles.values()], width=8)
    fig = Figure(figsize=(8, 3.6 + 0.16 * rows), layout="constrained")
    ax = fig.subplots()
    for i, (policy, records) in enumerate(trajectories.items()):
        look = styles[policy]
        line = look.line(len(records), i, len(trajectories))
        ax.step([r["step"] for r in records], [r["loss_scale"] for r in records], where="post",
                **{k: v for k, v in line.items() if k not in ("marker", "markevery", "markersize", "markerfacecolor")})
        marks = [r for r in records if not r["applied"]]
        if marks:
            ax.plot([r["step"] for r in marks], [r["loss_scale"] for r in marks], "x", color=look.color, zorder=3)
    ax.set_yscale("log", base=2)
    ax.set(title=f"{comparison.recipe}: loss scale per step (seed {comparison.seeds[0]})", xlabel="step",
           ylabel="loss scale")
    ax.tick_params(labelsize=FONT)
    handles = [_handle(s, marker=False) for s in styles.values()]
    _figure_legend(fig, handles, [s.label for s in styles.values()], ncols)
    return fig


def plain_log_formatter(minor_thresholds: tuple[float, float] = (1, 0.4)) -> Any:
    """Log-axis labels as plain numbers ('0.03', '2') on the ticks matplotlib's LogFormatter labels: only
    the decades when the axis spans more than one, a few minor ticks when it spans less, so they never
    crowd (every minor tick labelled, as before, wrote 0.002..0.009 on top of each other)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=False, minor_thresholds=minor_thresholds)


def _legend_shape(labels: list[str], width: float) -> tuple[int, int]:
    """Columns for a legend of ``labels`` below a figure ``width`` inches wide, and its rows of text."""
    longest = max((len(line) for label in labels for line in label.split("\n")), default=1)
    fits = int(width * 72 / (FONT * 0.62) // (longest + 6))  # a character is ~0.6 em; a handle ~6
    ncols = max(1, min(len(labels), fits))
    per_row = [max(label.count("\n") + 1 for label in labels[i:i + ncols]) for i in range(0, len(labels), ncols)]
    return ncols, sum(per_row) + 1


def _figure_legend(fig: Figure, handles: list, labels: list[str], ncols: int) -> None:
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=FONT, frameon=False)


def _handle(look: Look, marker: bool = True) -> Any:
    from matplotlib.lines import Line2D

    style = look.line(3)
    style.pop("markevery", None)
    style.pop("zorder", None)
    style.pop("solid_capstyle", None)
    if not marker:
        style.pop("marker", None)
    return Line2D([], [], **style)


def _mark_overlaps(styles: dict[str, Look], drawn: dict[str, list[tuple[np.ndarray, np.ndarray]]],
                   axes: list) -> dict[str, Look]:
    """Say in a policy's label when its curves lie on an earlier policy's in every panel."""
    for ax in axes:
        ax.autoscale_view()
    seen: list[str] = []
    result = dict(styles)
    for policy, curves in drawn.items():
        same = next((q for q in seen if all(_coincide(ax, a, b) for ax, a, b in zip(axes, drawn[q], curves,
                                                                                    strict=True))), None)
        if same is not None:
            result[policy] = replace(styles[policy], label=styles[policy].label + f"\n(overlaps {short_policy(same)})")
        seen.append(policy)
    return result


def _coincide(ax, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Both curves at the same steps and within `COINCIDE` of the axes' height of each other everywhere."""
    if a[0].shape != b[0].shape or not np.array_equal(a[0], b[0]) or not len(a[0]):
        return False
    to_axes = ax.transScale + ax.transLimits
    with np.errstate(all="ignore"):
        ya = to_axes.transform(np.column_stack([a[0], a[1]]))[:, 1]
        yb = to_axes.transform(np.column_stack([b[0], b[1]]))[:, 1]
    if not np.array_equal(np.isfinite(ya), np.isfinite(yb)):
        return False
    finite = np.isfinite(ya)
    return bool(not finite.any() or np.max(np.abs(ya[finite] - yb[finite])) < COINCIDE)


def _same_scales(a: list[dict], b: list[dict]) -> bool:
    return [(r["step"], r["loss_scale"]) for r in a] == [(r["step"], r["loss_scale"]) for r in b]


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


def _band(ax, steps: np.ndarray, values: np.ndarray, look: Look, index: int, count: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Draw the mean over seeds (and the min-max band); return the mean curve as drawn."""
    with warnings.catch_warnings():  # a column that is NaN for every seed (diverged) stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(values, axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    ax.plot(steps, mean, **look.line(len(steps), index, count))
    if len(values) > 1:
        ax.fill_between(steps, low, high, color=look.color, alpha=0.15, linewidth=0)
    return steps, mean


def _finals(ax, comparison: Comparison, styles: dict[str, Look], reference: str) -> Any:
    """Each seed's final metric per policy (markers), the mean (a bar), the reference's min-max (shaded);
    return the shaded band (for the figure's legend) or None."""
    ref = [r.final_metric for r in comparison.runs_of(reference)]
    band = None
    if len(ref) > 1 and all(math.isfinite(v) for v in ref):  # one seed has no spread to shade
        band = ax.axhspan(min(ref), max(ref), color=styles[reference].color, alpha=0.15, linewidth=0)
    for i, policy in enumerate(comparison.policies):
        look = styles[policy]
        finite = [v for v in (r.final_metric for r in comparison.runs_of(policy)) if math.isfinite(v)]
        ax.plot([i] * len(finite), finite, look.marker or "o", color=look.color, alpha=0.8, markerfacecolor="none")
        if finite:
            ax.plot([i - 0.25, i + 0.25], [np.mean(finite)] * 2, color=look.color, linewidth=2)
    ticks, crowded = _final_ticks(comparison)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7, rotation=90 if crowded else 0)
    ax.set_xlim(-0.6, len(comparison.policies) - 0.4)
    ax.set(title=f"final {comparison.metric} per seed", ylabel=comparison.metric)
    return band


def _final_ticks(comparison: Comparison) -> tuple[list[str], float]:
    """The final-metric panel's tick labels, and 0 when they fit side by side (~56 characters of 7-point
    text across the panel), else the inches they take standing upright: an upright label takes its lines'
    height across, never its length, so neighbours cannot overlap."""
    ticks = [wrap_policy(short_policy(p), TICK_WIDTH) for p in comparison.policies]
    longest = max(len(line) for tick in ticks for line in tick.split("\n"))
    return ticks, (0.0 if longest * len(ticks) <= 56 else longest * 7 * 0.6 / 72)


def _positive(ax) -> bool:
    data = [line.get_ydata() for line in ax.get_lines()]
    finite = [v for d in data for v in np.asarray(d, dtype=float) if math.isfinite(v)]
    return bool(finite) and min(finite) > 0
