"""`mixprec compare`: one recipe under several policies and seeds, side by side, with a report.

    mixprec compare --recipe digits --policies f32,f16-master,bf16-master --seeds 3

Prints a results table and a memory table (80 columns) and writes into --out: results.json,
PNG plots, report.md, and each run's metrics.jsonl and TensorBoard events under runs/.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import mixprec as mp
from mixprec.harness.checkpoints import check_writable
from mixprec.harness.processes import check_one_process
from mixprec.harness.training import Comparison, RunResult, split_policies, train
from mixprec.recipes import RECIPES, Recipe, get_recipe
from mixprec.report import (
    RunLogger,
    TrainingProgress,
    memory_table,
    render,
    results_table,
    short_policy,
    write_report,
)

from .train import add_run_arguments, default_device, slug

HELP = "Train one recipe under several policies and seeds side by side; print a table, write a report."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help=f"a built-in ({', '.join(RECIPES)}) or module.path:object for your own Recipe")
    parser.add_argument("--policies", default="f32,f16-master",
                        help="comma-separated policies (default f32,f16-master); key=value parts belong to "
                             "the policy before them: 'f32,f16-master,scaling=none' is two policies")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per policy (default 1)")
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/compare-RECIPE)")


@dataclass(frozen=True)
class Experiment:
    """One comparison to run: what `compare` runs once and `demo` runs for each of its experiments."""

    recipe: Recipe
    policies: list[str]  # canonical policy strings
    seeds: list[int]
    steps: int


def make_experiment(recipe: str | Recipe, policies: list[str], seeds: int, steps: int | None) -> Experiment:
    """Validate everything (recipe, policies, seeds, steps) before anything trains."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    parsed = [mp.Policy.parse(p) for p in policies]
    for policy in parsed:
        policy.make_scaler()  # a loss scale float32 cannot hold fails now, not after the other policies ran
    names = [str(p) for p in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"a policy is listed twice in {', '.join(policies)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    steps = recipe.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    return Experiment(recipe, names, list(range(seeds)), steps)


def run_experiments(experiments: list[Experiment], out: Path, args: argparse.Namespace,
                    diverging: bool = False) -> list[Comparison]:
    """Train every (policy, seed) of every experiment with one progress display; log each run to
    out/runs/RECIPE/POLICY/seedN (metrics.jsonl + TensorBoard). With `diverging`, a run `mp.step` stops
    (`mp.NaNStormError`: an ablation that diverges) is recorded as diverged instead of ending them all."""
    check_one_process(args.command)
    device = default_device(args.device)
    for experiment in experiments:
        for policy in experiment.policies:
            mp.Policy.parse(policy).resolve_execution(device)  # fails now if the device cannot run it
    check_writable(out)
    comparisons = []
    with TrainingProgress(enabled=not args.no_progress) as progress:
        for experiment in experiments:
            data = experiment.recipe.make_data()
            runs = []
            for policy in experiment.policies:
                for seed in experiment.seeds:
                    task = progress.add(f"{short_policy(policy)} s{seed}", total=experiment.steps)
                    folder = out / "runs" / experiment.recipe.name / slug(policy) / f"seed{seed}"
                    with RunLogger(folder) as logger:
                        def log(record: dict, task: int = task, logger: RunLogger = logger) -> None:
                            logger(record)
                            progress.update(task, record)

                        try:
                            runs.append(train(experiment.recipe, policy, seed=seed, steps=experiment.steps,
                                              data=data, device=device, threads=args.threads, log=log))
                        except mp.NaNStormError as error:
                            if not diverging:
                                raise
                            runs.append(RunResult.diverged(experiment.recipe, policy, seed, experiment.steps,
                                                           str(device), error))
            comparisons.append(Comparison(experiment.recipe.name, experiment.recipe.metric,
                                          experiment.recipe.higher_is_better, experiment.policies,
                                          experiment.seeds, runs, experiment.recipe.description))
    return comparisons


def print_tables(comparisons: list[Comparison]) -> None:
    for comparison in comparisons:
        print(render(results_table(comparison)).rstrip("\n"))
        print(render(memory_table(comparison)).rstrip("\n"))
        print()


def run(args: argparse.Namespace) -> int:
    experiment = make_experiment(args.recipe, split_policies(args.policies), args.seeds, args.steps)
    out = args.out or Path("runs") / f"compare-{experiment.recipe.name}"
    check_writable(out)
    n_runs = len(experiment.policies) * len(experiment.seeds)
    print(f"mixprec compare: {experiment.recipe.name}, {n_runs} runs of {experiment.steps} steps "
          f"({'; '.join(map(short_policy, experiment.policies))}; seeds {', '.join(map(str, experiment.seeds))})"
          f" -> {out}")
    start = time.perf_counter()
    comparisons = run_experiments([experiment], out, args)
    report = write_report(comparisons, out, device=default_device(args.device), threads=args.threads,
                          title=f"mixprec compare: {experiment.recipe.name}")
    print_tables(comparisons)
    print(f"report: {report}  ({time.perf_counter() - start:.0f} s)")
    return 0
