"""`mixprec demo`: the paper's findings on your machine in about a minute (2 CPU cores).

Runs `mixprec compare` on an embedded set of experiments and writes a report (default runs/demo):

* parity: a CNN with BatchNorm on handwritten digits trains to the same accuracy in FP32 and in
  f16-master (FP16 weights, activations and gradients; FP32 masters; dynamic loss scaling);
* loss scaling: with activation gradients in [2^-27, 2^-24), FP16 without loss scaling stalls
  (they flush to zero) and f16-master matches FP32;
* master weights: with updates below 2^-11 of their weights, 16-bit weights alone stall and
  f16-master matches FP32.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixprec.harness.training import Comparison
from mixprec.report import reference_policy, short_policy, summarize, write_report

from . import device_name, positive_int
from .compare import make_experiment, print_tables, run_experiments
from .train import default_device

HELP = "Run the embedded demo (~1 min on 2 CPU cores): FP32 parity and both FP16 failure modes."


@dataclass(frozen=True)
class DemoExperiment:
    recipe: str
    policies: tuple[str, ...]
    seeds: int
    steps: int
    expect: dict[str, str] = field(default_factory=dict)  # policy -> verdict word the paper predicts
    shows: str = ""


DEMO = (
    DemoExperiment("digits", ("f32", "f16-master"), seeds=3, steps=300, expect={"f16-master": "matches"},
                   shows="parity: FP16 storage and math with FP32 masters and loss scaling reach FP32's accuracy"),
    DemoExperiment("underflow", ("f32", "f16-master", "f16-master-noscale"), seeds=3, steps=300,
                   expect={"f16-master": "matches", "f16-master-noscale": "stalled"},
                   shows="loss scaling: small activation gradients flush to zero in FP16 without it"),
    DemoExperiment("tiny-updates", ("f32", "f16-master", "f16-pure"), seeds=3, steps=1000,
                   expect={"f16-master": "matches", "f16-pure": "stalled"},
                   shows="master weights: updates below 2^-11 of a weight are lost in FP16 without them"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder (default runs/demo)")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="run this fraction of every experiment's steps (default 1; e.g. 0.1 for a "
                             "quick smoke run whose numbers prove nothing)")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    experiments = [make_experiment(e.recipe, list(e.policies), e.seeds, max(1, round(e.steps * args.fraction)))
                   for e in DEMO]
    n_runs = sum(len(e.policies) * len(e.seeds) for e in experiments)
    print(f"mixprec demo: {len(experiments)} experiments, {n_runs} training runs -> {args.out}")
    start = time.perf_counter()
    comparisons = run_experiments(experiments, args.out, args)
    elapsed = time.perf_counter() - start
    demo_info = {"demo": {"fraction": args.fraction, "seconds": round(elapsed, 1)}}
    report = write_report(comparisons, args.out, device=default_device(args.device), threads=args.threads,
                          title="mixprec demo", extra=demo_info)
    print_tables(comparisons)
    print("What this shows" + (" (shortened run: the numbers prove nothing)" if args.fraction < 1 else "") + ":")
    for demo, comparison in zip(DEMO, comparisons, strict=True):
        print(f"  {demo.recipe}: {demo.shows}")
        for line in findings(comparison, demo.expect):
            print(f"    {line}")
    print(f"\nreport: {report}  ({elapsed:.0f} s of training)")
    return 0


def findings(comparison: Comparison, expect: dict[str, str]) -> list[str]:
    """'ok  f16-master: matches f32 (accuracy 0.9861 vs 0.9870, 0.0009 apart, tolerance 0.0052)', one line
    per expectation: the numbers the verdict was decided on (see `mixprec.report.verdict_sentence`)."""
    rows = {row["policy"]: row for row in summarize(comparison)}
    ref = rows[reference_policy(comparison)]
    lines = []
    for policy, word in expect.items():
        row = rows[policy]
        expected = row["verdict"] == word
        numbers = f"{comparison.metric} {row['mean']:.4g} vs {ref['mean']:.4g}"
        if row["verdict"] in ("matches", "better", "worse"):  # decided by the distance against the tolerance
            numbers += f", {abs(row['difference']):.3g} apart, tolerance {row['tolerance']:.3g}"
        lines.append(f"{'ok' if expected else 'UNEXPECTED'}  {short_policy(policy)}: {row['verdict_text']} "
                     f"({numbers})" + ("" if expected else f"; the paper predicts: {word}"))
    return lines
