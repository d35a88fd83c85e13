"""Step time of emulated 16-bit training against FP32, per-op and module-boundary emulation side by side.

For each recipe (lm, digits) and policy the whole training step is timed (forward under mp.autocast,
backward, mp.step, zero_grad), on the recipe's model and batches, one CPU thread. Policies:

* ``f32``: the reference;
* ``f16-master``: per-op emulation (the default on CPU);
* ``f16-master,execution=emulated-module``: rounding at module boundaries only;
* ``f16-master,execution=native``: torch's CPU autocast running real float16 kernels (the reference
  the emulation is tested against; what "slowly" means);
* ``bf16-master``: per-op emulation in bfloat16.

The sides are interleaved step by step (round robin), so drift in the machine hits all alike; the
median step after the warm-up is reported, and each ratio is a median over the FP32 median of the same
run. The goal: per-op emulated f16-master <= 2x FP32 on both recipes.

Usage:
    python benchmarks/bench_emulation.py [--steps 30] [--warmup 5] [--out benchmarks/results/emulation.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import mixprec as mp
from mixprec.harness.environment import environment
from mixprec.recipes import get_recipe
from mixprec.report import write_json

POLICIES = ["f32", "f16-master", "f16-master,execution=emulated-module", "f16-master,execution=native",
            "bf16-master"]


class Run:
    """One recipe under one policy, stepping on demand."""

    def __init__(self, recipe_name: str, policy: str, watched: bool = False) -> None:
        self.recipe = get_recipe(recipe_name)
        self.data = self.recipe.make_data()
        torch.manual_seed(0)
        model = self.recipe.make_model()
        opt = self.recipe.build_optimizer(model.parameters())
        self.model, self.opt, self.scaler = mp.prepare(model, opt, policy)
        self.watch = mp.watch(self.model) if watched else None  # bench_watch.py's watched side
        self.step_index, self.times = 0, []

    def step(self, timed: bool) -> None:
        batch = self.data.batch(self.step_index, self.recipe.batch_size, 0)
        tick = time.perf_counter()
        with mp.autocast(self.model):
            loss = self.recipe.loss(self.model, batch)
        self.scaler.scale(loss).backward()
        mp.step(self.opt, self.scaler, max_grad_norm=self.recipe.max_grad_norm)
        self.opt.zero_grad()
        if timed:
            self.times.append(time.perf_counter() - tick)
        self.step_index += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--recipes", default="lm,digits")
    parser.add_argument("--out", default="benchmarks/results/emulation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: dict[str, dict] = {}
    for name in args.recipes.split(","):
        runs = {policy: Run(name, policy) for policy in POLICIES}
        for i in range(args.warmup + args.steps):
            for run in runs.values():
                run.step(timed=i >= args.warmup)
        reference = statistics.median(runs["f32"].times)
        results[name] = {}
        for policy, run in runs.items():
            median = statistics.median(run.times)
            results[name][policy] = {"ms_median": round(median * 1e3, 2),
                                     "vs_f32": round(median / reference, 3)}
            print(f"{name:7s} {policy:40s} {median * 1e3:8.2f} ms  {median / reference:5.2f}x f32")

    record = {
        "benchmark": "emulation",
        **environment("cpu", torch.get_num_threads()),
        "timed": f"forward + backward + mp.step + zero_grad, median of {args.steps} steps after {args.warmup} "
                 "untimed, policies interleaved step by step",
        "goal": "per-op emulated f16-master <= 2x f32 on lm and digits",
        "results": results,
    }
    out = Path(args.out)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
