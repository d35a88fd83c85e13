"""`mixprec train`: one recipe under one policy, with a progress bar, logs, checkpoints and resume.

    mixprec train --recipe digits --policy f16-master --steps 300 --out runs/digits-f16
    mixprec train --recipe digits --policy f16-master --steps 300 --out runs/digits-f16 --resume
    mixprec train --recipe digits --policy f16-master --steps 300 --out runs/digits-f16 --overwrite
    torchrun --nproc-per-node 2 -m mixprec train --recipe digits --policy f16-master --out runs/digits-2p

Under torchrun each process trains on its slice of every batch; only rank 0 prints and writes files.
Writes into --out: metrics.jsonl (one record per step and evaluation), a TensorBoard event file,
checkpoint-NNNNNN.pt (the newest --keep-checkpoints of them, written atomically with a checksum: model,
optimizer with FP32 masters, loss scaler, LR schedule, RNG states, step and the history; see
mixprec.harness.checkpoints) and result.json.

A folder that already holds a run is refused (exit status 2) unless --resume (continue from its newest
intact checkpoint, skipping damaged newer ones with a line saying why) or --overwrite (remove the run's
files and start again, once every input is checked and the new run is built). A folder another run is
using (its lock file, .mixprec.lock) is refused, whatever the options. A resume rewrites metrics.jsonl
and the TensorBoard file from the checkpoint's history, so they read exactly as an uninterrupted run's,
whatever a kill left behind; it must inject the same --inject-faults as the run it continues.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.checkpoints import DEFAULT_KEEP, check_run_folder, check_writable, list_checkpoints
from mixprec.harness.faults import FaultPlan
from mixprec.harness.processes import rank_and_world_size, rows_per_process, run_folder_lock
from mixprec.harness.training import MAX_THREADS, train
from mixprec.harness.validation import check_before_writing, check_same_run, content_check, find_resumable
from mixprec.recipes import RECIPES, Recipe, get_recipe
from mixprec.report import RunLogger, TrainingProgress, environment, format_scale, write_json

from . import Once, device_name, non_negative_int, positive_int, seed_int

HELP = "Train one recipe under one policy: progress bar, JSONL + TensorBoard logs, checkpoints, --resume."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, action=Once,
                        help=f"a built-in ({', '.join(RECIPES)}) or module.path:object for your own Recipe")
    parser.add_argument("--policy", required=True, action=Once,
                        help=f"a preset ({', '.join(mp.PRESETS)}) or key=value pairs, e.g. 'f16-master,scaling=none'")
    add_run_arguments(parser)
    parser.add_argument("--seed", type=seed_int, default=0, action=Once,
                        help=f"initial weights and batch order, 0..{2**32 - 1} (default 0)")
    parser.add_argument("--out", type=out_folder, default=None, action=Once,
                        help="run folder (default runs/train/RECIPE-POLICY-seedSEED)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the run in --out (its checkpoints, logs and result.json only) and start again")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=DEFAULT_KEEP, metavar="N",
                        help=f"checkpoints kept in --out, the newest (default {DEFAULT_KEEP})")
    parser.add_argument("--stop-at", type=positive_int, default=None, metavar="K",
                        help="stop after step K (checkpointed), as if interrupted; continue with --resume")
    add_fault_arguments(parser)
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100, metavar="N",
                        help="steps between checkpoints (default 100; 0: only at the end, where one is "
                             "always written)")


def out_folder(text: str) -> Path:
    """argparse type: a run folder; an empty name is refused (Path("") is the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}; give e.g. --out runs/mine, or leave "
                                         "--out out for the default (runs/train/RECIPE-POLICY-seedSEED)")
    return Path(text)


def fault_plan(text: str) -> FaultPlan:
    """argparse type: a fault spec such as ``grad:inf@3,7;loss:nan@rate=0.01;seed=1`` (`mixprec.harness.faults`)."""
    try:
        return FaultPlan.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def thread_count(text: str) -> int:
    """argparse type: torch CPU threads, 1..MAX_THREADS (4 per CPU: torch crashes on counts like 100000)."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{MAX_THREADS} (4 per CPU of this machine's "
                                         f"{os.cpu_count()}), got {text!r}")
    return value


def storm_guard(text: str) -> int | str | None:
    """argparse type: ``auto``, 0 (off) or an integer >= 1: skipped steps in a row before a NaN storm stops."""
    if text == "auto":
        return text
    value = non_negative_int(text)
    return value or None


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Fault injection and the NaN-storm guard (train only)."""
    parser.add_argument("--inject-faults", type=fault_plan, default=None, metavar="SPEC", action=Once,
                        help="inject inf/NaN: ';'-joined KIND[TARGET]:VALUE@WHEN (KIND grad, loss or act; VALUE "
                             "inf, -inf or nan; WHEN steps 3,7,10-20 or rate=P) and seed=N, e.g. "
                             "'grad:inf@3,7;loss:nan@rate=0.01;seed=1'")
    parser.add_argument("--storm-guard", type=storm_guard, default="auto", metavar="K",
                        help="stop (exit status 1) after K skipped steps in a row, naming the parameters with "
                             "inf/NaN gradients and checkpointing the last good state; default auto (the loss "
                             "scaler's storm_limit(): 52 for default dynamic scaling, 50 for a fixed scale); 0: never")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train, compare and demo."""
    parser.add_argument("--steps", type=positive_int, default=None, action=Once,
                        help="training steps (default: the recipe's)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=thread_count, default=1,
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
    policy.make_scaler()  # a loss scale float32 cannot hold (static:1e-45 is 0.0) fails now, not at step 1
    device = default_device(args.device)
    execution = policy.resolve_execution(device)
    steps = args.steps if args.steps is not None else recipe.steps
    if args.stop_at is not None and args.stop_at > steps:
        raise ValueError(f"--stop-at must be in 1..{steps} (the run's steps), got {args.stop_at}")
    out = args.out or Path("runs") / "train" / f"{recipe.name}-{slug(str(policy))}-seed{args.seed}"
    rank, world_size = rank_and_world_size()  # torchrun's, or (0, 1)
    rows_per_process(recipe, world_size)
    check_before_writing(out, args.resume, args.overwrite, recipe, args.inject_faults, cli=True)  # creates nothing
    check_writable(out)
    try:
        if rank != 0:  # under torchrun rank 0 alone takes the folder's lock (train() does not take it again)
            return _run_in(out, args, recipe, policy, device, execution, steps)
        with run_folder_lock(out, cli=True, warn=_warn):  # one run per folder, from these checks to result.json
            return _run_in(out, args, recipe, policy, device, execution, steps)
    except OSError as error:  # a full disk, say: one line, not a traceback
        return _write_failed(out, error)


def _write_failed(out: Path, error: OSError) -> int:
    """Say in one line that a write into ``out`` failed (what, why, what is left, what to do); exit status 1.
    The writes leave nothing half-written: a checkpoint's or result.json's temporary file is removed, a torn
    metrics.jsonl line cut off (a resume rewrites metrics.jsonl and the TensorBoard file from its checkpoint)."""
    what = f"writing {error.filename!r}" if error.filename is not None else f"a write into {str(out)!r}"
    found = list_checkpoints(out)
    left = (f"the newest, {str(found[-1][1])!r}, is intact: {{}}, then continue the run with --resume (which "
            "rewrites the logs from it)" if found else "none was written yet: {}, then start the run again with "
            "--overwrite")
    fix = "free some space" if error.errno == errno.ENOSPC else "fix that"
    print(f"mixprec train: stopped: {what} failed: {error.strerror or error}; no checkpoint is half-written, and "
          + left.format(fix), file=sys.stderr)
    return 1


def _warn(line: str) -> None:
    print(f"mixprec train: warning: {line}", file=sys.stderr)


@contextlib.contextmanager
def _warnings_in_one_line() -> Iterator[None]:
    """Inside the block, every warning the filters let through prints once, as one line like the command's:
    mixprec's own (a checkpoint set aside, say) as they are; others (torch's lr_scheduler, a UserWarning of
    torch's or a recipe's) with their category and where they come from. The warnings module's settings are
    restored afterwards."""
    with warnings.catch_warnings():
        seen: set[str] = set()

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
            text = " ".join(str(message).split())  # one line, whatever the message's own line breaks
            if "mixprec" not in Path(filename).parts:
                text = f"{category.__name__} ({Path(filename).name}:{lineno}): {text}"
            if text not in seen:  # a warning repeated at every step is shown once
                seen.add(text)
                _warn(text)

        warnings.showwarning = show
        yield


def _run_in(out: Path, args: argparse.Namespace, recipe: Recipe, policy: mp.Policy, device: str, execution: str,
            steps: int) -> int:
    """Train in the run folder ``out`` (locked by rank 0): its checks, the start line, the run, the result."""
    rank, world_size = rank_and_world_size()
    rows = rows_per_process(recipe, world_size)
    lead = rank == 0  # under torchrun rank 0 alone prints and writes logs and results; the others train
    if lead:  # a folder holding a run: refused unless --resume or --overwrite (train() clears it once set up)
        check_run_folder(out, resume=args.resume, overwrite=args.overwrite, cli=True)
    faults = None if args.inject_faults is None else str(args.inject_faults)
    resume_from, history = None, []
    if args.resume:
        resume_from, checkpoint, skipped = find_resumable(out, content_check(recipe, steps), cli=True)  # train() too
        check_same_run(checkpoint, recipe, policy, args.seed, steps, faults, resume_from)
        history = checkpoint["history"]
        for reason in skipped if lead else ():
            print(f"mixprec train: warning: {reason}; skipped it, resuming from an older checkpoint (the file "
                  "stays in the folder)", file=sys.stderr)
    resume_step = history[-1]["step"] if history else None

    processes = f", {world_size} processes x {rows} rows of each batch" if world_size > 1 else ""
    if lead:
        ran = execution if execution == "native" else f"emulated {policy.emulation}"
        print(f"mixprec train: {recipe.name} under {policy} ({ran} on {device}), seed {args.seed}, "
              f"{steps} steps{processes} -> {out}"
              + (f", resuming at step {resume_step} from {resume_from.name}" if resume_from else ""))
    with contextlib.ExitStack() as stack:
        log = None
        if lead:
            # The logger starts at the first record, after train() has checked the folder (it would
            # refuse one that holds the logger's files): it writes metrics.jsonl and the TensorBoard
            # file afresh from the checkpoint's history, then appends.
            loggers: list[RunLogger] = []
            progress = stack.enter_context(TrainingProgress(enabled=not args.no_progress))
            task = progress.add(str(policy), total=args.stop_at or steps, completed=resume_step or 0)

            def log(record: dict) -> None:
                if not loggers:
                    loggers.append(stack.enter_context(RunLogger(out, history=history)))
                loggers[0](record)
                progress.update(task, record)

        try:
            stack.enter_context(_warnings_in_one_line())
            result = train(recipe, policy, seed=args.seed, steps=steps, device=device, out=out,
                           resume=resume_from or False, overwrite=args.overwrite, stop_at=args.stop_at,
                           checkpoint_every=args.checkpoint_every, keep=args.keep_checkpoints,
                           threads=args.threads, log=log, faults=args.inject_faults,
                           max_skips_in_a_row=args.storm_guard)
        except mp.NaNStormError as error:  # a run that cannot go on: say why in one line, no traceback
            if lead:
                hint = " (--storm-guard 0 keeps skipping instead)" if error.reason == "storm" else ""
                print(f"mixprec train: stopped: {error}{hint}", file=sys.stderr)
            return 1
        if lead and not loggers:  # resumed at the last step: nothing logged, the logs still made whole
            stack.enter_context(RunLogger(out, history=history))
    if not lead:
        return 0
    write_json(out / "result.json", {"environment": environment(device, args.threads), **result.to_dict()})
    done = "stopped at" if args.stop_at and args.stop_at < steps else "finished"
    print(f"{done} step {result.steps}: {recipe.metric} {result.final_metric:.4g} (from "
          f"{result.initial_metric:.4g}), loss {result.final_loss:.4g}, skipped steps {result.skipped_steps}, "
          f"loss scale {format_scale(result.final_loss_scale)}, {1000 * result.seconds_per_step:.1f} ms/step, "
          f"{result.execution}" + (f" ({result.emulation})" if result.emulation else "")
          + (f", {world_size} processes" if world_size > 1 else ""))
    print(f"logs, checkpoints and result.json in {out}  (tensorboard --logdir {out})")
    return 0
