"""The doctor's pictures and report: log2 histograms like the paper's Figure 3, against each format.

One PNG per kind of tensor (activations, weights, weight gradients, activation gradients): the share of
non-zero values per binary exponent (log2|x|), with FP16's normal range and subnormal band shaded,
BF16's and the FP8 formats' ranges marked, and, for gradients, the same histogram shifted by the
recommended loss scale. report.md ties them to the recommendation and its evidence; diagnosis.json
holds every number.

Example:
    >>> import tempfile, pathlib, torch, mixprec as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> d = mp.doctor(model, [torch.randn(8, 4)], lambda m, x: m(x).pow(2).mean())
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> sorted(p.name for p in write_doctor_report(d, folder, "tiny").parent.iterdir())[:3]
    ['activation.png', 'activation_grad.png', 'diagnosis.json']
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import mixprec as mp
from mixprec.harness.environment import environment

from .writers import write_json

EXPONENTS = mp.numerics.EXPONENTS  # the histogram's bins: floor(log2|x|), -149..127

TITLES = {"activation": "activations", "weight": "weights", "weight_grad": "weight gradients",
          "activation_grad": "activation gradients"}


def plot_histograms(diagnosis: mp.Diagnosis, folder: Path) -> list[Path]:
    """Write ``<kind>.png`` for each kind watched into `folder`; return their paths."""
    from matplotlib.figure import Figure

    paths = []
    fp16_range = diagnosis.scale_ranges.get(mp.F16.name)
    for kind, stats in diagnosis.totals.items():
        fig = Figure(figsize=(11, 3.8), layout="constrained")
        ax = fig.subplots()
        nonzero = max(stats.nonzero, 1)
        share = stats.histogram / nonzero
        used = np.flatnonzero(stats.histogram)
        low, high = (int(EXPONENTS[used[0]]) - 4, int(EXPONENTS[used[-1]]) + 4) if used.size else (-30, 20)
        shift = fp16_range.initial if fp16_range and not fp16_range.empty and kind.endswith("_grad") else None
        if shift is not None:
            low, high = min(low, -30), max(high + shift, 20)
        f16 = mp.F16
        ax.axvspan(math.log2(f16.min_subnormal), math.log2(f16.min_normal), color="gold", alpha=0.25,
                   label="FP16 subnormal")
        ax.axvspan(math.log2(f16.min_normal), math.log2(f16.max), color="tab:green", alpha=0.12,
                   label="FP16 normal range")
        for fmt, style in ((mp.E4M3, ":"), (mp.E5M2, "--")):
            for edge in (math.log2(fmt.min_subnormal), math.log2(fmt.max)):
                ax.axvline(edge, color="tab:purple", linestyle=style, linewidth=1,
                           label=f"{fmt.name} range" if edge == math.log2(fmt.max) else None)
        if low < math.log2(mp.BF16.min_subnormal) or high > math.log2(mp.BF16.max):
            ax.axvline(math.log2(mp.BF16.max), color="tab:blue", linestyle="-.", linewidth=1, label="BF16 max")
        ax.bar(EXPONENTS, share, width=1.0, align="edge", color="tab:gray", label="FP32 values (this run)")
        if shift is not None:
            ax.step(EXPONENTS + shift, share, where="post", color="tab:red",
                    label=f"scaled by 2^{shift} (recommended start)")
            center = float(np.average(EXPONENTS, weights=share + 1e-30))
            ax.annotate("", xy=(center + shift, share.max() * 0.9), xytext=(center, share.max() * 0.9),
                        arrowprops={"arrowstyle": "->", "color": "tab:red"})
        zeros = stats.zeros / stats.count if stats.count else 0.0
        ax.set(xlim=(low, high), xlabel="log2 |x|",
               ylabel="share of non-zero values",
               title=f"{TITLES.get(kind, kind)}: {stats.count:,} values, {100 * zeros:.3g}% exact zeros, "
                     f"max |x| {stats.amax:.3g}")
        fig.legend(fontsize=7, loc="outside right upper", frameon=False)  # beside the axes: it hides no bar
        path = folder / f"{kind}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def write_doctor_report(diagnosis: mp.Diagnosis, folder: Path | str, title: str, *, device: str = "cpu",
                        threads: int | None = None) -> Path:
    """Write the PNGs, diagnosis.json and report.md into `folder`; return the path of report.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(device, threads)
    pictures = plot_histograms(diagnosis, folder)
    write_json(folder / "diagnosis.json", {"environment": env, "title": title, **diagnosis.to_dict()})
    lines = [f"# mixprec doctor: {title}", "",
             f"Recommended policy: `{diagnosis.policy}`", "", "Why:", ""]
    lines += [f"- {e}" for e in diagnosis.evidence]
    lines += ["", f"Watched: {diagnosis.steps} FP32 steps; mixprec {env.get('mixprec')}, torch {env.get('torch')}, "
              f"{env.get('device_name', device)}, commit {env.get('git_commit')}, {env.get('date')}.", "",
              "## Values lost per format", "",
              "Share of the non-zero values of each kind (exact zeros are exact in every format) that would "
              "overflow / be subnormal / flush to zero when rounded to nearest onto the format (no loss scaling); "
              "the summary above quotes the same shares.", "",
              "| format | " + " | ".join(TITLES.get(k, k) for k in diagnosis.totals) + " |",
              "|---|" + "---:|" * len(diagnosis.totals)]
    for name, kinds in diagnosis.shares.items():
        cells = [" / ".join(_pct(kinds[k][w]) for w in ("overflow", "subnormal", "underflow"))
                 for k in diagnosis.totals]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if diagnosis.scale_ranges:
        lines += ["", "## Loss scales that bring the gradients into range", "",
                  "Activation and weight gradients together (a loss scale multiplies both), as shares of their "
                  "non-zero values.", "",
                  "| format | loss scales that fit | smallest (<= 0.1% flushed) | largest (no overflow) "
                  "| flushed unscaled |",
                  "|---|---|---:|---:|---:|"]
        for name, r in diagnosis.scale_ranges.items():
            lines.append(f"| {name} | {_fits(r)} | {_power(r.k_min, 'none')} | {_power(r.k_max, 'any')} "
                         f"| {_pct(r.lost_unscaled)} |")
    wide = {name: modules for name, modules in diagnosis.wider.items() if modules}
    if wide:
        lines += ["", "## Modules whose forward values overflow a format", ""]
        for name, modules in wide.items():
            lines.append(f"- {name}: " + ", ".join(f"`{m or '(root)'}`" for m in modules))
    lines += _fp8_section(diagnosis)
    lines += ["", "## Histograms", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fp8_section(diagnosis: mp.Diagnosis) -> list[str]:
    """The FP8 recommendation, its evidence, the per-layer table under each scaling and the per-operand one
    under the recommended scaling (tensorwise when none is recommended)."""
    if not diagnosis.fp8_layers and not diagnosis.fp8_evidence:
        return []
    policy = f"`{diagnosis.fp8_policy}`" if diagnosis.fp8_policy else "none"
    lines = ["", "## FP8 matmuls", "", f"Recommended FP8 policy: {policy}", ""]
    lines += [f"- {e}" for e in diagnosis.fp8_evidence]
    if not diagnosis.fp8_layers:
        return lines
    granularities = list(diagnosis.fp8_layers[0].shares)
    lines += ["", "Per Linear layer and scaling: the largest share of an operand's non-zero values that saturated / "
              "flushed to zero, over every cast a step of FP8 matmuls makes (input and weight onto E4M3, output "
              "gradient onto E5M2), as measured on this run's FP32 values.", "",
              "| layer | FP8 under the recommendation | " + " | ".join(granularities) + " |",
              "|---|---|" + "---:|" * len(granularities)]
    for v in diagnosis.fp8_layers:
        fp8 = "yes" if v.fp8 else f"no: {v.default}" if v.default else "no: kept in BF16 by a rule" if (
            diagnosis.fp8_policy) else "no"
        lines.append(f"| `{v.layer}` | {fp8} | " + " | ".join(v.cell(g) for g in granularities) + " |")
    chosen = mp.Policy.parse(diagnosis.fp8_policy).fp8 if diagnosis.fp8_policy else None
    granularity = chosen.granularity if chosen is not None else "tensorwise"
    lines += ["", f"Per operand under {granularity} scaling (every cast of the steps watched together):", "",
              "| layer | operand | format | casts | amax | scales | saturated | flushed |",
              "|---|---|---|---:|---:|---|---:|---:|"]
    for s in diagnosis.fp8_stats.values():
        if s.granularity == granularity:
            share = s.share()
            lines.append(f"| `{s.layer}` | {s.role} | {s.format} | {s.casts} | {s.amax:.4g} | "
                         f"{s.scale_min:.4g} .. {s.scale_max:.4g} | {_pct(share['saturated'])} | "
                         f"{_pct(share['flushed'])} |")
    return lines


def _fits(r: mp.numerics.ScaleRange) -> str:
    """The loss scales that fit, or why none does."""
    if not r.empty:
        return f"2^{r.k_min} .. 2^{r.k_max}"
    if r.k_min > 200:
        return "none: no scale keeps the flushed share <= 0.1%"
    return f"none: 2^{r.k_min} needed to flush <= 0.1%, 2^{r.k_max} the most without overflow"


def _power(k: int, unbounded: str) -> str:
    """2^k, or `unbounded` where the search found no bound (k past 200: nothing flushes / nothing overflows)."""
    return unbounded if abs(k) >= 200 else f"2^{k}"


def _pct(share: float) -> str:
    return "0" if share == 0 else f"{100 * share:.3g}%"
