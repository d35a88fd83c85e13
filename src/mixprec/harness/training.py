"""The reference training loop: one recipe under one policy and seed, and `compare` for many.

It uses only the public API, in the order the README's example shows users:

    model, optimizer, scaler = mp.prepare(model, optimizer, policy)
    with mp.autocast(model):
        loss = recipe.loss(model, batch)
    scaler.scale(loss).backward()
    info = mp.step(optimizer, scaler, max_grad_norm=recipe.max_grad_norm)
    if info.applied: scheduler.step()
    optimizer.zero_grad()

Runs are exactly reproducible from (recipe, policy, seed, steps): batch k is a pure function of
(seed, k), and a checkpoint holds everything else (model, optimizer with its FP32 masters, loss
scaler, LR schedule, RNG states, step), so a run stopped at step k and resumed ends bitwise equal to
an uninterrupted one on the CPU.

Under torchrun (``WORLD_SIZE`` > 1) the same loop runs data-parallel: each process trains a
DistributedDataParallel replica on its contiguous slice of the same global batch k, so the global
batch, and with it the run, does not depend on the number of processes (up to reduction order).

`train` checks its arguments, opens the run folder and makes the result; the run's phases in between
(set-up and resume, the steps, evaluation and logging, checkpoints) are `mixprec.harness.run_state`'s.

Example:
    >>> from mixprec.recipes import get_recipe
    >>> result = train(get_recipe("tiny-updates"), "f16-master", steps=20)
    >>> result.execution, result.steps, result.skipped_steps
    ('emulated', 20, 0)
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.checkpoints import DEFAULT_KEEP, check_writable
from mixprec.harness.determinism import isolated_rng, torch_threads
from mixprec.harness.faults import FaultPlan
from mixprec.harness.processes import (
    check_one_process,
    process_group,
    rank_and_world_size,
    rows_per_process,
    run_folder_lock,
)
from mixprec.harness.run_state import LOG_EVERY, Log, Record, RunSettings, RunState
from mixprec.harness.validation import (
    check_before_writing,
    check_same_data,
    check_same_run,
    content_check,
    data_sha256,
    open_run_folder,
)
from mixprec.recipes import Data, Recipe, get_recipe

#: the names other modules import from here (LOG_EVERY, Record and Log live in `run_state`)
__all__ = ["LOG_EVERY", "Comparison", "Log", "Record", "RunResult", "compare", "split_policies", "train"]


@dataclass
class RunResult:
    """What one training run did: the final metric, the numerics, cost, and the full history.

    ``history`` holds one record per step (``kind="step"``: loss, loss_scale, applied, grad_norm, lr)
    and one per evaluation (``kind="eval"``: metric), the evaluation at step 0 included.
    """

    recipe: str
    policy: str
    seed: int
    steps: int
    execution: str  # "native" | "emulated"
    device: str
    metric: str
    higher_is_better: bool
    initial_metric: float
    final_metric: float
    final_loss: float
    skipped_steps: int
    final_loss_scale: float
    seconds_per_step: float
    memory: dict[str, int]  # category (mp.memory's) -> bytes in the policy's formats; on CUDA "peak (measured)" too
    memory_source: str  # "counted" (native) or "counted; emulated: policy's formats" (see mp.memory), "; CUDA peak"
    data_info: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1  # processes that trained data-parallel (torchrun), each on 1/world_size of a batch
    history: list[Record] = field(default_factory=list, repr=False)
    emulation: str | None = None  # emulated: "per op" or "module boundaries" (see Policy.emulation)
    memory_held: dict[str, int] = field(default_factory=dict)  # category -> bytes the tensors held (mp.memory)
    faults: str | None = None  # the fault plan injected (its text), if any
    max_skips_in_a_row: int | str | None = "auto"  # the NaN-storm guard it ran under
    stopped: str | None = None  # why the run ended before its last step (a NaNStormError's message), if it did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def diverged(cls, recipe: Recipe, policy: str, seed: int, steps: int, device: str, error: Exception) -> RunResult:
        """A run that `mp.step` stopped (weights or every gradient inf/NaN): its metrics are NaN, so a
        comparison's verdict for it is "diverged", and `stopped` says why."""
        nan = math.nan
        return cls(recipe.name, policy, seed, steps, "-", device, recipe.metric, recipe.higher_is_better, nan, nan,
                   nan, 0, nan, nan, {}, "", stopped=str(error))


def train(
    recipe: Recipe | str,
    policy: mp.Policy | str,
    *,
    seed: int = 0,
    steps: int | None = None,
    data: Data | None = None,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    checkpoint_every: int | None = None,
    keep: int = DEFAULT_KEEP,
    threads: int | None = None,
    log: Log | None = None,
    faults: str | FaultPlan | None = None,
    max_skips_in_a_row: int | str | None = "auto",
) -> RunResult:
    """Train ``recipe`` under ``policy`` and return its `RunResult`.

    Args:
        recipe: a Recipe or a name for `mixprec.recipes.get_recipe`.
        policy: a Policy or its string (``"f16-master"``).
        seed: sets the initial weights and the batch order.
        steps: total steps (default: the recipe's). The LR schedule spans this many steps.
        data: the recipe's data, if already built (`compare` builds it once for all runs).
        device: where to train; execution is native or emulated as ``policy`` resolves on it.
        out: the run's folder, for its checkpoints ``checkpoint-000100.pt`` (written atomically at the
            end, at ``stop_at`` and every ``checkpoint_every`` steps; see `mixprec.harness.checkpoints`). A
            folder that already holds a run is refused unless ``resume`` or ``overwrite``, and so is a
            folder another process is using (its lock file ``.mixprec.lock``, held for the run; see
            `mixprec.harness.processes.run_folder_lock`). None: no checkpoints.
        resume: True: continue from the newest intact checkpoint in ``out`` (newer damaged ones are
            skipped with a warning naming them and why); a path: from that checkpoint. Same recipe,
            policy, seed, steps and faults (each checkpoint records them).
        overwrite: start afresh in an ``out`` that holds a run, removing the run's files (checkpoints,
            metrics.jsonl, result.json, TensorBoard event files; nothing else), once every argument is
            checked and the new run is built, right before its first record.
        stop_at: stop after this many steps (checkpointed), as if interrupted; resume later.
        checkpoint_every: steps between checkpoints (None or 0: only at the end and at ``stop_at``).
        keep: checkpoints kept in ``out`` (the newest; default 2, so a damaged newest one leaves an
            older one to resume from).
        threads: torch CPU threads for this run (restored afterwards), at most 4 per CPU (`MAX_THREADS`);
            None leaves torch's setting.
        log: called with every record (steps and evaluations) as the run makes it; under torchrun
            on rank 0 only.
        faults: a `mixprec.harness.faults.FaultPlan` or its spec (``"grad:inf@3,7;loss:nan@rate=0.01;seed=1"``):
            inf/NaN injected into gradients, the loss or activations at those steps (counted from 1).
        max_skips_in_a_row: the NaN-storm guard, passed to ``mp.step``: after this many skipped steps in
            a row (``"auto"``: the scaler's ``storm_limit()``; None: never) the run stops with
            ``mp.NaNStormError``, naming the parameters whose gradients (or weights) hold inf/NaN, after
            logging the step and checkpointing the last good state into ``out`` (a skipped step changes
            no weight, so the current state is it; if its weights are inf/NaN, nothing is saved and the
            error names the newest finite checkpoint). Weights that go inf/NaN while steps with finite
            gradients are applied stop the run too (`mixprec.harness.run_state.NonFiniteWeightsError`).

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (gloo on CPU, NCCL on
    ``cuda:LOCAL_RANK``) unless one is open, and trains a DistributedDataParallel replica on its
    contiguous 1/world_size of every batch; ``recipe.batch_size`` must divide evenly. Rank 0 alone
    logs and writes the checkpoint; losses are averaged over the ranks, so they are the global batch's.

    Syncs: ``mp.step``'s one per step, one per LOG_EVERY steps for the losses (an all-reduce under
    torchrun), and the evaluations; under torchrun also DDP's gradient all-reduce and a barrier per
    checkpoint.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    policy = mp.Policy.parse(policy)
    steps = recipe.steps if steps is None else steps
    _check_arguments(steps, stop_at, checkpoint_every, keep, threads)
    plan = FaultPlan.parse(faults) if faults is not None else None
    rank, world_size = rank_and_world_size()
    rows_per_process(recipe, world_size)  # before anything starts: raises if the batch does not split
    device = _process_device(torch.device(device), world_size)
    out = Path(out) if out is not None else None
    if (resume is not False or overwrite) and out is None:
        raise ValueError("resume and overwrite need the run's folder (out=...)")
    check_before_writing(out, resume, overwrite, recipe, plan)  # before the folder is made: nothing created
    if out is not None:
        check_writable(out)
    with contextlib.ExitStack() as held:
        if out is not None and rank == 0:  # one process per run folder; under torchrun rank 0 holds it
            held.enter_context(run_folder_lock(out, warn=lambda line: warnings.warn(line, stacklevel=6)))
        source, checkpoint, replaced = open_run_folder(out, resume, overwrite, rank, content_check(recipe, steps))
        if data is None:
            with torch_threads(1):  # the same data under any --threads (a matmul's sums depend on the count)
                data = recipe.make_data()
        digest = data_sha256(data)
        if checkpoint is not None:
            check_same_run(checkpoint, recipe, policy, seed, steps, None if plan is None else str(plan), source)
            check_same_data(checkpoint, source, digest)
        data = _on_device(data, device)
        settings = RunSettings(recipe=recipe, policy=policy, seed=seed, steps=steps,
                               end=steps if stop_at is None else stop_at, device=device, rank=rank,
                               world_size=world_size, out=out, checkpoint_every=checkpoint_every, keep=keep,
                               max_skips_in_a_row=max_skips_in_a_row, faults=None if plan is None else str(plan),
                               data_sha256=digest)

        with process_group(device, world_size), isolated_rng(seed), torch_threads(threads):
            # Every rank draws the same initial weights and, step by step, the same random numbers, so the
            # RNG state rank 0 checkpoints is every rank's.
            run = RunState(settings, data, plan, log if log is not None and rank == 0 else _no_log)  # rank 0 logs
            for path in replaced:  # --overwrite: the old run goes only now, every input checked, the new one built
                path.unlink(missing_ok=True)
            run.begin(checkpoint, source)
            run.train()
            memory, memory_source, memory_held = run.measure_memory()
    return _result(run, memory, memory_source, memory_held)


# ----- the run's set-up and its result ----------------------------------------------------------------


#: the most torch CPU threads a run takes: 4 per CPU (torch crashes on counts such as 100000)
MAX_THREADS = 4 * (os.cpu_count() or 1)


def _check_arguments(steps: int, stop_at: int | None, checkpoint_every: int | None, keep: int,
                     threads: int | None = None) -> None:
    """ValueError for a number of steps, a stop, a checkpoint interval, a count kept or threads out of range."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be in 1..{MAX_THREADS} (4 per CPU of this machine's {os.cpu_count()}), "
                         f"got {threads}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if stop_at is not None and not 0 < stop_at <= steps:
        raise ValueError(f"stop_at must be in 1..{steps} (the run's steps), got {stop_at}")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 or None: only at the end), got {checkpoint_every}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints kept in out), got {keep}")


def _process_device(device: torch.device, world_size: int) -> torch.device:
    """This process's device: under torchrun, a CUDA device without an index is ``cuda:LOCAL_RANK``."""
    if world_size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    return device


def _on_device(data: Data, device: torch.device) -> Data:
    """The recipe's data, every tensor moved to ``device``."""
    return Data(tuple(t.to(device) for t in data.train), tuple(t.to(device) for t in data.test), data.info)


def _no_log(record: Record) -> None:
    pass


def _result(run: RunState, memory: dict[str, int], memory_source: str, memory_held: dict[str, int]) -> RunResult:
    """The `RunResult` of a run that trained to its end (its history, settings and memory)."""
    settings, recipe, history = run.settings, run.settings.recipe, run.history
    step_records = [r for r in history if r["kind"] == "step"]
    evals = [r for r in history if r["kind"] == "eval"]
    last = step_records[-1] if step_records else {"loss": math.nan, "loss_scale": math.nan, "skipped_steps": 0}
    return RunResult(
        recipe=recipe.name, policy=str(settings.policy), seed=settings.seed, steps=len(step_records),
        execution=run.execution, emulation=None if run.execution == "native" else settings.policy.emulation,
        device=str(settings.device), metric=recipe.metric, higher_is_better=recipe.higher_is_better,
        initial_metric=evals[0]["metric"], final_metric=evals[-1]["metric"], final_loss=last["loss"],
        skipped_steps=int(last["skipped_steps"]), final_loss_scale=last["loss_scale"],
        seconds_per_step=run.train_seconds / max(1, len(step_records)), memory=memory,
        memory_source=memory_source, data_info=dict(run.data.info), world_size=settings.world_size,
        history=history, memory_held=memory_held, faults=settings.faults,
        max_skips_in_a_row=settings.max_skips_in_a_row,
    )


# ----- comparing policies ---------------------------------------------------------------------------


@dataclass
class Comparison:
    """Runs of one recipe under several policies and seeds, in policy order."""

    recipe: str
    metric: str
    higher_is_better: bool
    policies: list[str]
    seeds: list[int]
    runs: list[RunResult]
    description: str = ""

    def runs_of(self, policy: str) -> list[RunResult]:
        return [r for r in self.runs if r.policy == policy]

    def summary(self, policy: str) -> dict[str, Any]:
        """Final metric mean / std / min / max over seeds, and the numerics and costs of the runs."""
        runs = self.runs_of(policy)
        measured = next((r for r in runs if r.stopped is None), runs[0])  # a diverged run measured nothing
        finals = [r.final_metric for r in runs]
        finite = [v for v in finals if math.isfinite(v)]
        return {
            "policy": policy,
            "seeds": [r.seed for r in runs],
            "final_metric": finals,
            "mean": statistics.fmean(finite) if len(finite) == len(finals) else math.nan,
            "std": statistics.stdev(finite) if len(finite) == len(finals) > 1 else 0.0,
            "min": min(finals) if finite == finals else math.nan,
            "max": max(finals) if finite == finals else math.nan,
            "initial_metric": statistics.fmean(r.initial_metric for r in runs),
            "skipped_steps": statistics.fmean(r.skipped_steps for r in runs),
            "final_loss_scale": runs[-1].final_loss_scale,
            "seconds_per_step": statistics.fmean(r.seconds_per_step for r in runs),
            "memory": measured.memory,
            "memory_source": measured.memory_source,
            "memory_held": measured.memory_held,
            "execution": measured.execution,
            "emulation": measured.emulation,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "metric": self.metric, "higher_is_better": self.higher_is_better,
            "description": self.description, "policies": self.policies, "seeds": self.seeds,
            "summary": [self.summary(p) for p in self.policies],
            "runs": [r.to_dict() for r in self.runs],
        }


def split_policies(text: str) -> list[str]:
    """'f32,f16-master,scaling=none;bf16-pure' -> ['f32', 'f16-master,scaling=none', 'bf16-pure'].

    A part without '=' starts a policy (a preset name); a key=value part continues the current one.
    """
    policies: list[str] = []
    for group in text.split(";"):
        current: list[str] = []
        for part in (p.strip() for p in group.split(",")):
            if not part:
                continue
            if "=" not in part and current:
                policies.append(",".join(current))
                current = []
            current.append(part)
        if current:
            policies.append(",".join(current))
    if not policies:
        raise ValueError(f"no policies in {text!r}; give e.g. --policies f32,f16-master")
    return policies


def compare(
    recipe: Recipe | str,
    policies: Sequence[mp.Policy | str],
    *,
    seeds: int | Sequence[int] = 1,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    log: Callable[[str, int, Record], None] | None = None,
) -> Comparison:
    """Train ``recipe`` under each policy and seed (``seeds=3`` means seeds 0, 1, 2) on the same data.

    ``log(policy, seed, record)`` sees every record of every run.

    Example:
        >>> c = compare("tiny-updates", ["f32", "f16-pure"], steps=10)
        >>> [s["policy"] for s in map(c.summary, c.policies)]
        ['f32', 'f16-pure']
    """
    check_one_process("compare")
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    names = [str(mp.Policy.parse(p)) for p in policies]  # parse all first: fail before any training
    if not names:
        raise ValueError("compare needs at least one policy, e.g. ['f32', 'f16-master']")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("compare needs at least one seed")
    with torch_threads(1):  # as train makes it: the same data under any thread count
        data = recipe.make_data()
    runs = []
    for name in names:
        for seed in seed_list:
            run_log = None if log is None else (lambda record, n=name, s=seed: log(n, s, record))
            runs.append(train(recipe, name, seed=seed, steps=steps, data=data, device=device,
                              threads=threads, log=run_log))
    return Comparison(recipe.name, recipe.metric, recipe.higher_is_better, names, seed_list, runs,
                      recipe.description)
