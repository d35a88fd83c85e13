"""Reports: verdicts, 80-column tables, JSONL/TensorBoard logs, results.json, plots and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

import mixprec as mp
from mixprec.cli.demo import findings
from mixprec.harness.training import Comparison, RunResult, compare
from mixprec.report import (
    RunLogger,
    format_bytes,
    format_metric,
    format_scale,
    markdown_tables,
    memory_table,
    render,
    report_markdown,
    results_table,
    short_policy,
    summarize,
    verdicts,
    wrap_policy,
    write_report,
)
from mixprec.report.plots import _aligned, _running_mean, curves_figure, loss_scale_figure


def _run(policy: str, seed: int, final: float, initial: float = 0.1, steps: int = 4) -> RunResult:
    history = [{"kind": "eval", "step": 0, "metric": initial}]
    for s in range(1, steps + 1):
        history.append({"kind": "step", "step": s, "loss": 1.0 / s, "loss_scale": 2.0**16 if s > 2 else 2.0**17,
                        "applied": s != 2, "grad_norm": 1.0, "lr": 0.1, "skipped_steps": int(s >= 2)})
    history.append({"kind": "eval", "step": steps, "metric": final})
    return RunResult(recipe="toy", policy=policy, seed=seed, steps=steps, execution="emulated", device="cpu",
                     metric="accuracy", higher_is_better=True, initial_metric=initial, final_metric=final,
                     final_loss=0.25, skipped_steps=1, final_loss_scale=2.0**16, seconds_per_step=0.01,
                     memory={"parameters": 1000, "masters": 2000, "gradients": 2000, "optimizer_state": 4000,
                             "activations": 500},
                     memory_source="counted; emulated: policy's formats",
                     data_info={"corpus_sha256": "ab" * 32, "corpus_bytes": 10},
                     history=history)


def _toy_comparison() -> Comparison:
    finals = {"f32": [0.95, 0.96, 0.97], "f16-master": [0.955, 0.96, 0.965], "f16-pure": [0.2, 0.15, 0.1],
              "bf16-pure": [0.5, 0.6, 0.7], "f16-master-noscale": [math.nan, 0.9, 0.9]}
    runs = [_run(p, s, v) for p, values in finals.items() for s, v in enumerate(values)]
    return Comparison("toy", "accuracy", True, list(finals), [0, 1, 2], runs, "a toy task")


def test_verdicts_against_the_fp32_reference():
    found = verdicts(_toy_comparison())
    assert {p: v.word for p, v in found.items()} == {
        "f32": "reference", "f16-master": "matches", "f16-pure": "stalled", "bf16-pure": "worse",
        "f16-master-noscale": "diverged"}
    assert found["f16-master"].within_range and not found["bf16-pure"].within_range
    assert found["f16-pure"].gain == pytest.approx((0.1 - 0.15) / (0.1 - 0.96))
    assert found["f16-pure"].text("f32") == "stalled: 6% of f32's gain"


def test_one_seed_gets_a_tolerance_of_two_percent_of_the_gain():
    runs = [_run("f32", 0, 0.90), _run("f16-master", 0, 0.89), _run("bf16-master", 0, 0.85)]
    c = Comparison("toy", "accuracy", True, ["f32", "f16-master", "bf16-master"], [0], runs)
    found = verdicts(c)
    assert found["f16-master"].word == "matches"  # 0.01 <= 2% of 0.8
    assert found["bf16-master"].word == "worse"


def test_lower_is_better_metrics():
    runs = [_run("f32", 0, 1.0, initial=8.0), _run("f16-master", 0, 0.5, initial=8.0)]
    for r in runs:
        r.higher_is_better = False
    c = Comparison("toy", "bits/byte", False, ["f32", "f16-master"], [0], runs)
    assert verdicts(c)["f16-master"].word == "better"


def test_number_formats():
    assert format_scale(2.0**16) == "2^16" and format_scale(1.0) == "2^0" and format_scale(1000.0) == "1000"
    assert format_bytes(100) == "100B" and format_bytes(2048) == "2K" and format_bytes(5 * 2**20) == "5M"
    assert format_metric(0.97, 0.01, 3) == "0.9700 ± 0.0100" and format_metric(0.97, 0.0, 1) == "0.9700"
    assert format_metric(math.nan, 0, 3) == "nan"


def test_tables_fit_80_columns_and_say_what_matters():
    c = _toy_comparison()
    results = render(results_table(c))
    memory = render(memory_table(c))
    for text in (results, memory):
        assert max(len(line) for line in text.splitlines()) <= 80
    assert "f16-master-noscale" in results  # the longest preset name is not cut
    assert "0.9600±0.0050" in results and "stalled" in results and "2^16" in results and "emul" in results
    assert "counted" in memory and "9.28K" in memory  # total of the categories


def test_run_logger_writes_jsonl_and_tensorboard_and_truncates_on_resume(tmp_path):
    with RunLogger(tmp_path) as log:
        for record in _run("f32", 0, 0.9).history:
            log(record)
        log({"kind": "step", "step": 5, "loss": math.nan, "loss_scale": 1.0, "applied": True})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and lines[-1]["loss"] is None  # NaN written as null: strict JSON
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # A resume passes its checkpoint's history: metrics.jsonl is rewritten to hold exactly that.
    with RunLogger(tmp_path, history=lines[:3], tensorboard=False):
        pass
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:3] and [r["step"] for r in kept] == [0, 1, 2]


def test_running_mean_and_alignment_of_curves():
    assert _running_mean(np.array([[1.0, 3.0, 5.0, 7.0]]), 2).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    steps, values = _aligned([[(0, 1.0), (5, 2.0), (10, 3.0)], [(0, 4.0), (10, 6.0)]])
    assert steps.tolist() == [0, 10] and values.tolist() == [[1.0, 3.0], [4.0, 6.0]]


def test_write_report_on_a_real_comparison(tmp_path):
    c = compare("underflow", ["f32", "f16-master", "f16-master-noscale"], seeds=2, steps=30, threads=1)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend: writing a report must not switch it
    try:
        path = write_report([c], tmp_path, title="test report")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    results = json.loads((tmp_path / "results.json").read_text())
    env = results["environment"]
    assert {"device", "device_name", "torch", "python", "git_commit", "date", "mixprec"} <= set(env)
    # which 16-bit CPU features the machine has, as /proc/cpuinfo lists them (AMX-BF16 or not decides speed)
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line.split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []) \
        if cpuinfo.exists() else []
    assert env["cpu_flags"] == [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16",
                                            "amx_int8") if f in flags]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    (experiment,) = results["experiments"]
    assert experiment["reference"] == "f32" and len(experiment["runs"]) == 6
    verdict = {row["policy"]: row["verdict"] for row in experiment["summary"]}
    assert verdict == {"f32": "reference", "f16-master": "matches", "f16-master-noscale": "stalled"}
    assert experiment["runs"][0]["history"][0] == {"kind": "eval", "step": 0,
                                                   "metric": experiment["runs"][0]["initial_metric"]}

    report = path.read_text()
    assert report.startswith("# test report") and "| `f16-master-noscale` |" in report
    for png in ("underflow-curves.png", "underflow-loss-scale.png"):
        assert f"]({png})" in report
        image = matplotlib.image.imread(tmp_path / png)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_summarize_rows_carry_totals_and_verdict_text():
    rows = {r["policy"]: r for r in summarize(_toy_comparison())}
    assert rows["f32"]["memory_total"] == 9500
    assert rows["f16-master"]["verdict_text"] == "matches f32"


# ----- long policy strings, legends, labels: figures that read ----------------------------------------

LONG = [str(mp.Policy.parse(p)) for p in (
    "f32", "f16-master,scaling=dynamic:16777216", "bf16-master,execution=emulated",
    "f16-master,scaling=static:1024,rule=head:fp32", "f16-mixed,scaling=dynamic:4096,execution=emulated",
    "f16-master-noscale")]


def _long_comparison() -> Comparison:
    finals = [0.95, 0.94, 0.95, 0.5, 0.93, 0.95]
    runs = [_run(p, s, f + 0.001 * s, steps=40) for p, f in zip(LONG, finals, strict=True) for s in range(2)]
    return Comparison("toy", "accuracy", True, LONG, [0, 1], runs)


def _drawn(fig):
    FigureCanvasAgg(fig).draw()  # lays the figure out (constrained layout) and measures its text
    return fig.get_window_extent()


def _inside(box, canvas) -> bool:
    return box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1 and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1


def _disjoint(boxes) -> bool:
    return not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _labels(axis) -> list:
    ticks = axis.get_majorticklabels() + axis.get_minorticklabels()
    return [t.get_window_extent() for t in ticks if t.get_visible() and t.get_text()]


def test_short_policy_is_the_same_policy_in_fewer_characters():
    assert LONG[1].startswith("params=fp16,compute=fp16,output=fp32") and len(LONG[1]) > 90
    assert [short_policy(p) for p in LONG] == [
        "f32", "f16-master,scaling=dynamic:16777216", "bf16-master,execution=emulated",
        "f16-master,scaling=static:1024,rule=head:fp32", "f16-mixed,scaling=dynamic:4096,execution=emulated",
        "f16-master-noscale"]
    assert all(mp.Policy.parse(short_policy(p)) == mp.Policy.parse(p) for p in LONG)
    assert short_policy("not a policy") == "not a policy"
    assert wrap_policy("f16-master,scaling=static:1024,rule=head:fp32", 24) == \
        "f16-master,\nscaling=static:1024,\nrule=head:fp32"


def test_terminal_tables_break_long_policies_after_commas():
    text = render(results_table(_long_comparison())) + render(memory_table(_long_comparison()))
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = [line.split()[0] for line in text.splitlines() if line.strip()]
    assert "scaling=dynamic:16777216" in lines and "f16-master," in lines  # two lines, split where a comma is
    assert "params=fp16" not in text
    markdown = markdown_tables(_long_comparison())
    assert "| `f16-master,scaling=dynamic:16777216` |" in markdown
    assert f"`f16-master,scaling=dynamic:16777216` is `{LONG[1]}`" in markdown  # the full form is still said


def test_curves_with_long_policies_keep_legend_titles_and_ticks_on_the_canvas():
    fig = curves_figure(_long_comparison())
    canvas = _drawn(fig)
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert _inside(box, canvas)
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)  # below the axes, covering none
    titles = [ax.title.get_window_extent() for ax in fig.axes]
    assert _disjoint(titles) and all(_inside(t, canvas) for t in titles)
    final = fig.axes[2]
    ticks = _labels(final.xaxis)
    assert len(ticks) == len(LONG) and _disjoint(ticks) and all(_inside(t, canvas) for t in ticks)
    assert max(max(t.width, t.height) for t in ticks) < 0.2 * canvas.width  # no label as long as the figure
    texts = [t.get_text() for t in legend.get_texts()]
    assert "f16-master,scaling=dynamic:16777216" in texts and not any("params=" in t for t in texts)


def test_loss_scale_legend_sits_below_the_axes():
    fig = loss_scale_figure(_long_comparison())
    canvas = _drawn(fig)
    (legend,) = fig.legends
    assert _inside(legend.get_window_extent(), canvas)
    assert not legend.get_window_extent().overlaps(fig.axes[0].get_window_extent())
    assert fig.axes[0].get_legend() is None


def test_log_loss_axis_labels_do_not_crowd():
    runs = []
    for policy in ("f32", "f16-master"):
        run = _run(policy, 0, 0.9, steps=300)
        for record in run.history:
            if record["kind"] == "step":
                record["loss"] = 2.3 * 0.975 ** record["step"] + 5e-4  # 2.3 down to ~1e-3: three decades
        runs.append(run)
    fig = curves_figure(Comparison("toy", "accuracy", True, ["f32", "f16-master"], [0], runs))
    _drawn(fig)
    loss_axis = fig.axes[1].yaxis
    labels = _labels(loss_axis)
    assert len(labels) >= 3 and _disjoint(labels)
    assert {t.get_text() for t in loss_axis.get_majorticklabels() if t.get_text()} >= {"0.01", "0.1", "1"}


def test_agreeing_policies_get_their_own_colour_style_and_marker_and_say_so():
    runs = [_run(p, s, 0.9) for p in ("f32", "f16-master", "f16-master-noscale") for s in range(2)]
    for run in runs:
        if run.policy == "f16-master-noscale":
            for record in run.history:
                if record["kind"] == "step":
                    record["loss"] *= 3.0  # a different loss curve: it does not lie on top of the others
    c = Comparison("toy", "accuracy", True, ["f32", "f16-master", "f16-master-noscale"], [0, 1], runs)
    fig = curves_figure(c)
    _drawn(fig)
    lines = [line for line in fig.axes[0].get_lines()]
    looks = {(tuple(line.get_color()), line.get_linestyle(), line.get_marker(), line.get_linewidth()) for line in lines}
    assert len(lines) == 3 and len(looks) == 3
    assert len({tuple(line.get_color()) for line in lines}) == 3 and len({line.get_linestyle() for line in lines}) == 3
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:3] == ["f32", "f16-master\n(overlaps f32)", "f16-master-noscale"]
    scale_texts = [t.get_text() for t in loss_scale_figure(c).legends[0].get_texts()]
    assert scale_texts[1] == "f16-master\n(x: 1 skipped step; overlaps f32)"


def test_the_findings_state_the_test_the_verdict_passed():
    # f16-master is 0.0049 above f32's mean: outside f32's tight min-max, within the tolerance (2% of the gain)
    finals = {"f32": [0.9000, 0.9001, 0.9002], "f16-master": [0.905, 0.905, 0.905], "bf16-pure": [0.85, 0.85, 0.85]}
    runs = [_run(p, s, v) for p, values in finals.items() for s, v in enumerate(values)]
    c = Comparison("toy", "accuracy", True, list(finals), [0, 1, 2], runs)
    rows = {r["policy"]: r for r in summarize(c)}
    assert rows["f16-master"]["verdict"] == "matches" and not rows["f16-master"]["within_reference_range"]
    assert rows["f16-master"]["tolerance_basis"] == "gain"
    text = report_markdown([c], {}, {"date": "d", "device": "cpu", "device_name": "x", "torch": "t", "python": "p",
                                     "mixprec": "m", "cpu_threads": 1})
    matched = next(line for line in text.splitlines() if line.startswith("- `f16-master`"))
    assert "outside" not in matched
    assert "matches f32: mean 0.905 vs f32's 0.9001, 0.0049 apart, within the tolerance of 0.016 (2% of f32's gain" \
        in matched
    worse = next(line for line in text.splitlines() if line.startswith("- `bf16-pure`"))
    assert "worse than f32" in worse and "beyond the tolerance of 0.016" in worse
    assert findings(c, {"f16-master": "matches"}) == [
        "ok  f16-master: matches f32 (accuracy 0.905 vs 0.9001, 0.0049 apart, tolerance 0.016)"]
