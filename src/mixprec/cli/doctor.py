"""`mixprec doctor`: is a recipe's model safe in FP16, does it need BF16, what loss scale, which layers?

    mixprec doctor --recipe underflow
    mixprec doctor --recipe my_task.py:recipe --batches 5 --json

Runs a few FP32 training steps of the recipe under `mp.watch`, prints the recommended policy with its
evidence (or JSON with --json), the FP8 policy its Linear layers' casts allow (`Diagnosis.fp8_policy`,
with a per-layer table of saturated and flushed shares under each scaling), and writes report.md,
diagnosis.json and one histogram PNG per kind of tensor (the paper's Figure 3, for your model) into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mixprec as mp
from mixprec.harness.checkpoints import check_writable
from mixprec.harness.determinism import isolated_rng, torch_threads
from mixprec.recipes import RECIPES, get_recipe
from mixprec.report import clean_json
from mixprec.report.doctor import write_doctor_report

from . import positive_int, seed_int
from .train import default_device

HELP = ("Watch a recipe's model in FP32 for a few steps; recommend a policy (and an FP8 one), with histograms and "
        "evidence.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help=f"a built-in ({', '.join(RECIPES)}), module.path:object or path/file.py:object")
    parser.add_argument("--batches", type=positive_int, default=3,
                        help="FP32 training steps to watch (default 3)")
    parser.add_argument("--seed", type=seed_int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.md, diagnosis.json and the PNGs (default runs/doctor/RECIPE-seedSEED)")
    parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe)
    device = default_device(args.device)
    out = args.out or Path("runs") / "doctor" / f"{recipe.name}-seed{args.seed}"
    check_writable(out)
    data = recipe.make_data()
    with isolated_rng(args.seed), torch_threads(args.threads):
        model = recipe.make_model().to(device)
        optimizer = recipe.build_optimizer(model.parameters())
        batches = [tuple(t.to(device) for t in data.batch(step, recipe.batch_size, args.seed))
                   for step in range(args.batches)]
        diagnosis = mp.doctor(model, batches, recipe.loss, optimizer=optimizer)
    report = write_doctor_report(diagnosis, out, f"recipe {recipe.name}, seed {args.seed}", device=device,
                                 threads=args.threads)
    if args.json:
        print(json.dumps(clean_json({"recipe": recipe.name, "report": str(report), **diagnosis.to_dict()}), indent=1))
    else:
        print(f"mixprec doctor: {recipe.name} ({args.batches} FP32 steps on {device}, seed {args.seed})")
        print(diagnosis)
        print(f"\nreport, histograms and diagnosis.json in {out}  (try: mixprec train --recipe {args.recipe} "
              f"--policy '{diagnosis.policy}')")
        if diagnosis.fp8_policy:
            print(f"FP8 matmuls: mixprec train --recipe {args.recipe} --policy '{diagnosis.fp8_policy}'")
    return 0

