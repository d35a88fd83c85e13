"""`mixprec paper`: the paper's experiments across its application families, in one command.

For each family (a built-in recipe with the family's real ingredients), the same model on the same data
under four variants over 3 seeds: FP32, the paper's recipe (`f16-master`: FP16 storage, FP32 masters,
dynamic loss scaling, FP32 accumulation), the recipe without loss scaling (`f16-master-noscale`) and
without master weights (`f16-pure,scaling=dynamic`). The report has the paper's tables' shape: the metric in
FP32 and in mixed precision, the gap against FP32's seed spread, which variants stalled or diverged, the
loss scale where it ended, and the share of non-zero activation gradients that flush to zero in FP16
without loss scaling (the paper's Figure 3 statistic, measured on the FP32 model by `mp.doctor`).

    mixprec paper                          # every family, 3 seeds (about 20 minutes on 2 CPU cores)
    mixprec paper --quick                  # 1 seed, a quarter of the steps (the numbers prove little)
    mixprec paper --families detection,lm
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.training import Comparison
from mixprec.recipes import RECIPES, Recipe, get_recipe
from mixprec.report import summarize, write_report

from . import device_name, positive_int
from .compare import make_experiment, run_experiments
from .train import default_device

HELP = "Run the paper's experiments across its application families: FP32 vs mixed precision vs ablations."

#: family -> the recipe that stands for it (its name in mixprec.recipes.RECIPES).
FAMILIES: dict[str, str] = {
    "classification": "digits",
    "detection": "detection",
    "speech": "speech",
    "translation": "translation",
    "language-modelling": "lm",
}
VARIANTS = {"FP32": "f32", "mixed precision": "f16-master", "no loss scaling": "f16-master-noscale",
            "no master weights": "f16-pure,scaling=dynamic"}
QUICK_FRACTION = 0.25
NOTES = ("Variants: FP32 `f32`; mixed precision `f16-master` (the paper's recipe); no loss scaling "
         "`f16-master-noscale`; no master weights `f16-pure,scaling=dynamic` (FP16 weights stepped directly: the "
         "optimizer's state is FP16 too, so Adam's eps of 1e-8, below FP16's smallest subnormal, and small second "
         "moments flush to zero and an update can divide by zero: *diverged*). A verdict compares the mean final "
         "metric with FP32's over the seeds (see report.md). The last column is the paper's Figure 3 statistic: "
         "the share of the FP32 model's non-zero activation gradients that flush to zero in FP16 without loss "
         "scaling, over a few batches (`mp.doctor`).")
FIGURE3_BATCHES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated families (default all: {', '.join(FAMILIES)})")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="seeds per variant (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 seed and {QUICK_FRACTION:g} of every recipe's steps: a smoke run, not a result")
    parser.add_argument("--out", type=Path, default=Path("runs/paper"), help="report folder (default runs/paper)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def chosen_families(text: str) -> list[str]:
    """The families named in `text`, checked: each known, and its recipe installed."""
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown families {unknown or [text]}; valid: {', '.join(FAMILIES)}")
    missing = [f for f in names if FAMILIES[f] not in RECIPES]
    if missing:
        raise ValueError(f"family {missing[0]!r} has no recipe in this mixprec ({FAMILIES[missing[0]]!r})")
    return list(dict.fromkeys(names))


def activation_gradient_underflow(recipe: Recipe, batches: int = FIGURE3_BATCHES) -> float:
    """The share of non-zero activation gradients of the FP32 model that flush to zero in FP16 without loss
    scaling, over a few batches (the paper's Figure 3 statistic), measured by `mp.doctor`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = recipe.make_model()
        data = recipe.make_data()
        diagnosis = mp.doctor(model, [data.batch(i, recipe.batch_size, 0) for i in range(batches)], recipe.loss,
                              formats=["fp16"], fp8=False)
    return float(diagnosis.shares["fp16"]["activation_grad"]["underflow"])


def paper_rows(families: list[str], comparisons: list[Comparison], underflow: dict[str, float]) -> list[dict]:
    """One row per family: the variants' metrics and verdicts against FP32, the loss scale, Figure 3's share."""
    rows = []
    for family, comparison in zip(families, comparisons, strict=True):
        summary = {row["policy"]: row for row in summarize(comparison)}
        names = {label: str(mp.Policy.parse(p)) for label, p in VARIANTS.items()}
        ref, mixed = summary[names["FP32"]], summary[names["mixed precision"]]
        spread = max(ref["max"] - ref["min"], 0.0) if math.isfinite(ref["max"]) else math.nan
        rows.append({
            "family": family, "recipe": comparison.recipe, "metric": comparison.metric,
            "higher_is_better": comparison.higher_is_better,
            "fp32": (ref["mean"], ref["std"]), "mixed": (mixed["mean"], mixed["std"]),
            "gap": mixed["mean"] - ref["mean"], "fp32_spread": spread,
            "verdicts": {label: summary[names[label]]["verdict"] for label in VARIANTS if label != "FP32"},
            "loss_scale": mixed["final_loss_scale"], "skipped": mixed["skipped_steps"],
            "underflow": underflow[family],
        })
    return rows


def paper_table(rows: list[dict]) -> str:
    """The paper's table as markdown: one line per family."""
    lines = ["| family | recipe | metric | FP32 | mixed precision | gap (FP32 min-max) | no loss scaling | "
             "no master weights | final loss scale | act. grads flushed in FP16 unscaled |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        arrow = "higher better" if r["higher_is_better"] else "lower better"
        lines.append(
            f"| {r['family']} | `{r['recipe']}` | {r['metric']} ({arrow}) | {r['fp32'][0]:.4g} ± {r['fp32'][1]:.2g} | "
            f"{r['mixed'][0]:.4g} ± {r['mixed'][1]:.2g} ({r['verdicts']['mixed precision']}) | "
            f"{r['gap']:+.3g} ({r['fp32_spread']:.3g}) | {r['verdicts']['no loss scaling']} | "
            f"{r['verdicts']['no master weights']} | 2^{math.log2(r['loss_scale']):.0f} | "
            f"{100 * r['underflow']:.3g}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    families = chosen_families(args.families)
    seeds = args.seeds or (1 if args.quick else 3)
    fraction = QUICK_FRACTION if args.quick else 1.0
    experiments = []
    for family in families:
        recipe = get_recipe(FAMILIES[family])
        experiments.append(make_experiment(recipe, list(VARIANTS.values()), seeds,
                                           max(1, round(recipe.steps * fraction))))
    n_runs = sum(len(e.policies) * len(e.seeds) for e in experiments)
    print(f"mixprec paper: {len(families)} families ({', '.join(families)}), {len(VARIANTS)} variants, {seeds} "
          f"seed(s): {n_runs} training runs -> {args.out}" + (" (quick: the numbers prove little)" * args.quick))
    start = time.perf_counter()
    underflow = {family: activation_gradient_underflow(e.recipe) for family, e in zip(families, experiments,
                                                                                        strict=True)}
    comparisons = run_experiments(experiments, args.out, args, diverging=True)
    elapsed = time.perf_counter() - start
    rows = paper_rows(families, comparisons, underflow)
    table = paper_table(rows)
    extra: dict[str, Any] = {"paper": {"families": families, "seeds": seeds, "quick": args.quick,
                                       "seconds": round(elapsed, 1), "rows": rows}}
    report = write_report(comparisons, args.out, device=default_device(args.device), threads=args.threads,
                          title="mixprec paper: the paper's application families", extra=extra)
    paper_md = f"# mixprec paper\n\n{table}\n\n{NOTES}\n\nFull report: [report.md](report.md)\n"
    (args.out / "paper.md").write_text(paper_md)
    print(table)
    print(f"\nreport: {report}, table: {args.out / 'paper.md'}  ({elapsed:.0f} s)")
    return 0
