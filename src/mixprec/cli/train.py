"""`mixprec train`: one recipe under one policy, with a progress bar, logs, checkpoints and resume.

    mixprec train --recipe digits --policy f16-master --steps 300 --out runs/digits-f16
    mixprec train --recipe digits --policy f16-master --steps 300 --out runs/digits-f16 --resume
    torchrun --nproc-per-node 2 -m mixprec train --recipe digits --policy f16-master --out runs/digits-2p

Under torchrun each process trains on its slice of every batch; only rank 0 prints and writes files.
Writes into --out: metrics.jsonl (one record per step and evaluation), TensorBoard event files,
checkpoint.pt (atomic; model, optimizer with FP32 masters, loss scaler, LR schedule, RNG states and
step) and result.json.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import torch

import mixprec as mp
from mixprec.checkpoints import check_writable, checkpoint_step
from mixprec.processes import rank_and_world_size, rows_per_process
from mixprec.recipes import RECIPES, get_recipe
from mixprec.report import RunLogger, TrainingProgress, environment, format_scale, write_json
from mixprec.training import train

HELP = "Train one recipe under one policy: progress bar, JSONL + TensorBoard logs, checkpoints, --resume."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help=f"a built-in ({', '.join(RECIPES)}) or module.path:object for your own Recipe")
    parser.add_argument("--policy", required=True,
                        help=f"a preset ({', '.join(mp.PRESETS)}) or key=value pairs, e.g. 'f16-master,scaling=none'")
    add_run_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder (default runs/train/RECIPE-POLICY-seedSEED)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--stop-at", type=int, default=None, metavar="K",
                        help="stop after step K (checkpointed), as if interrupted; continue with --resume")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="steps between checkpoints (default 100; one is always written at the end)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train, compare and demo."""
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are small, and more threads "
                             "mostly wait on each other, badly so on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def slug(text: str) -> str:
    """A file-name-safe form of a policy string: 'params=f16,compute=f16' -> 'params-f16_compute-f16'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("=", "-")).strip("_")


def run(args: argparse.Namespace) -> int:
    # Check every input before training starts: a typo should cost a second, not a run.
    recipe = get_recipe(args.recipe)
    policy = mp.Policy.parse(args.policy)
    device = default_device(args.device)
    execution = policy.resolve_execution(device)
    steps = args.steps if args.steps is not None else recipe.steps
    out = args.out or Path("runs") / "train" / f"{recipe.name}-{slug(str(policy))}-seed{args.seed}"
    rank, world_size = rank_and_world_size()  # torchrun's, or (0, 1)
    rows = rows_per_process(recipe, world_size)
    check_writable(out)
    resume_step = None
    if args.resume:
        resume_step = checkpoint_step(out, recipe, policy, args.seed, steps)

    processes = f", {world_size} processes x {rows} rows of each batch" if world_size > 1 else ""
    lead = rank == 0  # under torchrun rank 0 alone prints and writes logs and results; the others train
    if lead:
        print(f"mixprec train: {recipe.name} under {policy} ({execution} on {device}), seed {args.seed}, "
              f"{steps} steps{processes} -> {out}"
              + (f", resuming at step {resume_step}" if resume_step is not None else ""))
    with contextlib.ExitStack() as stack:
        log = None
        if lead:
            logger = stack.enter_context(RunLogger(out, resume_step=resume_step))
            progress = stack.enter_context(TrainingProgress(enabled=not args.no_progress))
            task = progress.add(str(policy), total=args.stop_at or steps, completed=resume_step or 0)

            def log(record: dict) -> None:
                logger(record)
                progress.update(task, record)

        result = train(recipe, policy, seed=args.seed, steps=steps, device=device, out=out, resume=args.resume,
                       stop_at=args.stop_at, checkpoint_every=args.checkpoint_every, threads=args.threads,
                       log=log)
    if not lead:
        return 0
    write_json(out / "result.json", {"environment": environment(device, args.threads), **result.to_dict()})
    done = "stopped at" if args.stop_at and args.stop_at < steps else "finished"
    print(f"{done} step {result.steps}: {recipe.metric} {result.final_metric:.4g} (from "
          f"{result.initial_metric:.4g}), loss {result.final_loss:.4g}, skipped steps {result.skipped_steps}, "
          f"loss scale {format_scale(result.final_loss_scale)}, {1000 * result.seconds_per_step:.1f} ms/step, "
          f"{result.execution}" + (f", {world_size} processes" if world_size > 1 else ""))
    print(f"logs, checkpoint and result.json in {out}  (tensorboard --logdir {out})")
    return 0
