"""Whether a checkpoint belongs to this run and fits it, checked before anything of it is loaded.

A checksum tells a damaged file from an intact one, not an intact file from one whose contents were
edited (or written by a buggy tool) and checksummed again. So before a resume loads a checkpoint:

* `check_same_run`: it is of this recipe, policy, seed, steps and faults (else an error: another run);
* `check_same_data`: the recipe made the same data (its `data_sha256`; else an error);
* `open_run_folder`: the checkpoint a run resumes from, the newest that loads and fits (via the next);
* `content_check(recipe, steps)`: its step, history, model state, RNG state and LR schedule fit the run
  (else a ValueError naming the file and what is wrong, which `find_checkpoint` takes as its reason
  to skip the file and fall back to the next older one, as it does for a damaged file).

Example:
    >>> from mixprec.recipes import get_recipe
    >>> check = content_check(get_recipe("tiny-updates"), steps=20)
    >>> check({"step": 35, "history": []}, Path("checkpoint-000035.pt"))
    Traceback (most recent call last):
    ValueError: checkpoint 'checkpoint-000035.pt' does not fit this run: its step 35 is not in 0..20 ...
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.checkpoints import (
    LEGACY_CHECKPOINT_NAME,
    check_run_folder,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    not_checkpoints,
    run_files,
)
from mixprec.harness.determinism import isolated_rng, rng_state, set_rng_state
from mixprec.harness.faults import FaultInjector, FaultPlan
from mixprec.recipes import Data, Recipe

#: checks a loaded checkpoint (its state, its path) and raises a one-line ValueError if it does not fit
ContentCheck = Callable[[dict[str, Any], Path], None]


def check_same_run(checkpoint: dict[str, Any], recipe: Recipe, policy: mp.Policy, seed: int,
                   steps: int, faults: str | None = None, path: Path | None = None) -> None:
    """ValueError naming the checkpoint's file (``path``) and the differences if ``checkpoint`` is not of this
    recipe, policy, seed, steps and faults (a `FaultPlan`'s text or None; not checked in a checkpoint older
    than the record of them). Every checkpoint in a folder is of its one run: no older one would fit better.
    The policy may differ in its master mode alone (``--resume --policy bf16-compact`` from bf16-master):
    checkpoints keep FP32 weights and masters, which every master mode loads."""
    wanted = {"recipe": recipe.name, "policy": str(policy), "seed": seed, "steps": steps, "faults": faults}
    different = {k: (checkpoint[k], v) for k, v in wanted.items() if k in checkpoint and checkpoint[k] != v}
    if "policy" in different and _same_but_master(checkpoint["policy"], policy):
        del different["policy"]
    if different:
        what = ", ".join(f"faults (--inject-faults) {old or 'none'} (asked: {new or 'none'})" if k == "faults" else
                         f"{k} {old!r} (asked: {new!r})" for k, (old, new) in different.items())
        which = f" (checkpoint {str(path)!r})" if path is not None else ""
        raise ValueError(f"the checkpoint is of another run: {what}{which}; resume with the same settings, or start "
                         "this run in another folder (--out, out=)")


def _same_but_master(saved: Any, policy: mp.Policy) -> bool:
    """Whether policy text `saved` is `policy` but for its master mode, both with masters."""
    try:
        old = mp.Policy.parse(saved)
    except (TypeError, ValueError):
        return False
    with_masters = old.master is not None and policy.master is not None
    return with_masters and old.replace(master="fp32") == policy.replace(master="fp32")


def check_before_writing(out: Path | None, resume: bool | str | Path, overwrite: bool, recipe: Recipe,
                         plan: FaultPlan | None, cli: bool = False) -> None:
    """What can be refused before the run folder is made (nothing is created if it is): resume and overwrite
    together, a resume of a folder that does not exist, and faults aimed at what the model lacks (checked on
    a fresh model, under its own seed: no RNG state outside changes). ``cli`` words it with the options."""
    resume_opt, overwrite_opt = ("--resume", "--overwrite") if cli else ("resume=True", "overwrite=True")
    if resume is not False and overwrite:
        raise ValueError(f"{resume_opt} continues the run in the folder and {overwrite_opt} replaces it: "
                         "pass one of them")
    if resume is True and out is not None and not Path(out).is_dir():
        raise ValueError(f"no checkpoint to resume from in {str(out)!r}: the folder does not exist (nothing was "
                         f"created); check its name, or start the run there without {resume_opt}")
    if plan is not None and plan.faults:
        with isolated_rng(0):
            FaultInjector(plan, recipe.make_model())  # raises naming the fault whose target the model lacks


def find_resumable(out: Path, check: ContentCheck, cli: bool = False) -> tuple[Path, dict[str, Any], list[str]]:
    """`find_checkpoint`, with advice that fits a folder holding no checkpoint at all: start the run without
    resume if the folder holds no run, or again with overwrite if it holds one (a start without is refused)."""
    if not list_checkpoints(out) and not (Path(out) / LEGACY_CHECKPOINT_NAME).exists():
        resume_opt, overwrite_opt = ("--resume", "--overwrite") if cli else ("resume=True", "overwrite=True")
        files = sorted({p.name for p in run_files(out)})
        advice = (f"it holds a run ({', '.join(files)}) that wrote none: start the run again with {overwrite_opt}, "
                  "which deletes those files" if files else f"start the run without {resume_opt}")
        raise ValueError(f"no checkpoint to resume from in {str(out)!r}: {advice}")
    return find_checkpoint(out, check)


def open_run_folder(out: Path | None, resume: bool | str | Path, overwrite: bool, rank: int,
                     check: ContentCheck) -> tuple[Path | None, dict[str, Any] | None, list[Path]]:
    """Check ``out`` holds no other run (rank 0 checks it): (the path and state of the checkpoint to resume
    from, its contents checked by ``check``, None and None for a fresh run, and the old run's files an
    overwrite is to remove). Warns (on rank 0) about the newer damaged or unfitting checkpoints it skipped,
    and things with a checkpoint's name that are not files (kept: never deleted)."""
    if out is None:
        return None, None, []
    replaced = []
    if rank == 0:  # one process decides: the others start after it (the process group waits)
        replaced = check_run_folder(out, resume=resume is not False, overwrite=overwrite)
        for line in not_checkpoints(out):
            warnings.warn(line, stacklevel=3)
    if resume is False:
        return None, None, replaced
    if resume is True:
        path, checkpoint, skipped = find_resumable(out, check)
        for reason in skipped if rank == 0 else ():
            # stacklevel 3: the warning names the line that called train()
            warnings.warn(f"{reason}; skipped it, resuming from an older checkpoint (the file stays in the folder)",
                          stacklevel=3)
        return path, checkpoint, []
    checkpoint = load_checkpoint(Path(resume))
    check(checkpoint, Path(resume))
    return Path(resume), checkpoint, []


# ----- the data ---------------------------------------------------------------------------------------


def data_sha256(data: Data) -> str:
    """The sha256 of a recipe's data: every train and test tensor's dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for tensor in (*data.train, *data.test):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype} {tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def check_same_data(checkpoint: dict[str, Any], path: Path | None, digest: str) -> None:
    """ValueError if ``checkpoint`` records a data checksum other than ``digest`` (one that records none,
    written before the checksum was, is not checked)."""
    saved = checkpoint.get("data_sha256")
    if saved is not None and saved != digest:
        where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        raise ValueError(f"the recipe's data differ from the data {where} was trained on (sha256 {str(saved)[:12]}..., "
                         f"now {digest[:12]}...): its make_data has changed, or depends on something besides its "
                         "code; resume with the data the run was started with, or start the run again with --overwrite")


# ----- the contents -------------------------------------------------------------------------------------


def content_check(recipe: Recipe, steps: int) -> ContentCheck:
    """A check of a checkpoint's contents against a run of ``recipe`` over ``steps`` steps: the step in
    0..steps, a history of exactly its steps, the model state's keys and shapes, a well-formed RNG state
    and an LR schedule's state like the run's. A reference model is built on first use (under its own seed:
    no RNG state outside changes)."""
    reference: dict[str, Any] = {}

    def check(state: dict[str, Any], path: Path) -> None:
        if not reference:
            reference.update(_reference(recipe, steps))
        try:
            step = _check_step(state.get("step"), steps)
            _check_history(state.get("history"), step)
            _check_model(state.get("model"), reference["model"])
            _check_rng(state.get("rng"))
            _check_scheduler(state.get("scheduler"), reference["scheduler"], step)
        except ValueError as error:
            raise ValueError(f"checkpoint {str(path)!r} does not fit this run: {error}") from None

    return check


def _reference(recipe: Recipe, steps: int) -> dict[str, Any]:
    """The shapes of a fresh model's state and a fresh LR schedule's state, drawn under their own seed."""
    with isolated_rng(0):
        model = recipe.make_model()
        optimizer = recipe.build_optimizer(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: recipe.lr_factor(s, steps))
        return {"model": {k: tuple(v.shape) for k, v in model.state_dict().items()},
                "scheduler": scheduler.state_dict()}


def _check_step(step: Any, steps: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise ValueError(f"its step {step!r} is not in 0..{steps} (the run's steps)")
    return step


def _check_history(history: Any, step: int) -> None:
    """One eval record at step 0 first, then the step records 1..step in order, no record past step."""
    if not isinstance(history, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                                and r.get("kind") in ("step", "eval") for r in history):
        raise ValueError("its history is not a list of step and eval records")
    if not history or history[0]["kind"] != "eval" or history[0]["step"] != 0:
        raise ValueError(f"its history does not begin with the evaluation at step 0 (it holds {len(history)} "
                         f"records), at step {step}")
    done = [r["step"] for r in history if r["kind"] == "step"]
    if done != list(range(1, step + 1)) or max(r["step"] for r in history) > step:
        seen = f"steps {done[0]}..{done[-1]} ({len(done)} records)" if done else "no steps"
        raise ValueError(f"its step is {step} but its history holds {seen}; a history of steps 1..{step} was expected")


def _check_model(model: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """The model state holds exactly the model's keys, each a tensor of the model's shape (dtypes may differ:
    parameters are saved as their FP32 values)."""
    if not isinstance(model, dict):
        raise ValueError(f"its model state is a {type(model).__name__}, not a state dict")
    extra, missing = sorted(set(model) - set(shapes)), sorted(set(shapes) - set(model))
    if extra or missing:
        raise ValueError(f"its model state has keys the model lacks {extra[:5]} and lacks keys {missing[:5]}")
    for key, shape in shapes.items():
        value = model[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"its model state's {key!r} has shape {got}, the model's has {shape}")


def _check_rng(rng: Any) -> None:
    """The RNG states are those `rng_state` saves, and load (tried, then the states before put back)."""
    if not isinstance(rng, dict) or set(rng) != {"torch", "cuda", "python", "numpy"}:
        raise ValueError("its RNG state is not a dict of torch, cuda, python and numpy states")
    wanted = torch.get_rng_state()
    torch_state = rng["torch"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != wanted.dtype or \
            torch_state.shape != wanted.shape:
        raise ValueError(f"its torch RNG state is not a {wanted.dtype} tensor of shape {tuple(wanted.shape)}")
    cuda = rng["cuda"]
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        raise ValueError("its CUDA RNG state is not a list of uint8 tensors")
    before = rng_state()
    try:
        set_rng_state(rng)
    except Exception as error:  # random.setstate, numpy and torch raise TypeError, ValueError, RuntimeError...
        raise ValueError(f"its RNG state does not load: {type(error).__name__}: {str(error)[:120]}") from None
    finally:
        set_rng_state(before)


def _check_scheduler(scheduler: Any, fresh: dict[str, Any], step: int) -> None:
    """The LR schedule's state has a fresh one's keys and kinds of values, and counts at most ``step`` steps."""
    if not isinstance(scheduler, dict) or set(scheduler) != set(fresh):
        keys = sorted(scheduler) if isinstance(scheduler, dict) else type(scheduler).__name__
        raise ValueError(f"its LR schedule state does not load: keys {keys}, expected {sorted(fresh)}")
    for key, value in fresh.items():
        if _kind(scheduler[key]) != _kind(value):
            raise ValueError(f"its LR schedule state's {key!r} is {scheduler[key]!r:.60}, not like {value!r:.60}")
    if not isinstance(scheduler["last_epoch"], int) or not 0 <= scheduler["last_epoch"] <= step:
        raise ValueError(f"its LR schedule counts {scheduler['last_epoch']} steps, more than its step {step}")


def _kind(value: Any) -> Any:
    """What a state value is, for comparing: numbers as 'number', lists element by element, else the type."""
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number" if value == value and abs(value) != float("inf") else "non-finite"
    if isinstance(value, (list, tuple)):
        return [_kind(v) for v in value]
    return type(value).__name__
