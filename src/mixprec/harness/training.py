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
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mixprec as mp
from mixprec.harness.checkpoints import (
    DEFAULT_KEEP,
    check_same_run,
    check_writable,
    find_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
)
from mixprec.harness.determinism import isolated_rng, rng_state, set_rng_state, torch_threads
from mixprec.harness.faults import FaultInjector, FaultPlan
from mixprec.harness.processes import check_one_process, process_group, rank_and_world_size, rows_per_process, shard
from mixprec.recipes import Data, Recipe, get_recipe

LOG_EVERY = 10  # steps between reading losses back from the device (one extra sync per LOG_EVERY steps)

Record = dict[str, Any]
Log = Callable[[Record], None]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(  # noqa: C901, PLR0915
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
            folder that already holds a run is refused unless ``resume`` or ``overwrite``. None: no
            checkpoints.
        resume: True: continue from the newest intact checkpoint in ``out`` (newer damaged ones are
            skipped with a warning naming them and why); a path: from that checkpoint. Same recipe,
            policy, seed and steps.
        overwrite: start afresh in an ``out`` that holds a run, removing the run's files (checkpoints,
            metrics.jsonl, result.json, TensorBoard event files; nothing else).
        stop_at: stop after this many steps (checkpointed), as if interrupted; resume later.
        checkpoint_every: steps between checkpoints (None or 0: only at the end and at ``stop_at``).
        keep: checkpoints kept in ``out`` (the newest; default 2, so a damaged newest one leaves an
            older one to resume from).
        threads: torch CPU threads for this run (restored afterwards); None leaves torch's setting.
        log: called with every record (steps and evaluations) as the run makes it; under torchrun
            on rank 0 only.
        faults: a `mixprec.harness.faults.FaultPlan` or its spec (``"grad:inf@3,7;loss:nan@rate=0.01;seed=1"``):
            inf/NaN injected into gradients, the loss or activations at those steps (counted from 1).
        max_skips_in_a_row: the NaN-storm guard, passed to ``mp.step``: after this many skipped steps in
            a row (``"auto"``: the scaler's ``storm_limit()``; None: never) the run stops with
            ``mp.NaNStormError``, naming the parameters whose gradients (or weights) hold inf/NaN, after
            logging the step and checkpointing the last good state into ``out`` (a skipped step changes
            no weight, so the current state is it).

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
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if stop_at is not None and not 0 < stop_at <= steps:
        raise ValueError(f"stop_at must be in 1..{steps} (the run's steps), got {stop_at}")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 or None: only at the end), got {checkpoint_every}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints kept in out), got {keep}")
    plan = FaultPlan.parse(faults) if faults is not None else None
    rank, world_size = rank_and_world_size()
    rows_per_process(recipe, world_size)  # before anything starts: raises if the batch does not split
    device = torch.device(device)
    if world_size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    out = Path(out) if out is not None else None
    if (resume is not False or overwrite) and out is None:
        raise ValueError("resume and overwrite need the run's folder (out=...)")
    if out is not None:
        check_writable(out)
        if rank == 0:  # one process decides: the others start after it (the process group waits)
            prepare_run_folder(out, resume=resume is not False, overwrite=overwrite)
    checkpoint = None
    if resume is True:
        _, checkpoint, skipped = find_checkpoint(out)
        for reason in skipped if rank == 0 else ():
            warnings.warn(f"{reason}; skipped it, resuming from an older checkpoint", stacklevel=2)
    elif resume is not False:
        checkpoint = load_checkpoint(Path(resume))
    if checkpoint is not None:
        check_same_run(checkpoint, recipe, policy, seed, steps)

    data = recipe.make_data() if data is None else data
    data = Data(tuple(t.to(device) for t in data.train), tuple(t.to(device) for t in data.test), data.info)
    if log is None or rank != 0:
        log = _no_log  # under torchrun only rank 0 logs

    with process_group(device, world_size), isolated_rng(seed), torch_threads(threads):
        # Every rank draws the same initial weights and, step by step, the same random numbers, so the
        # RNG state rank 0 checkpoints is every rank's.
        model = recipe.make_model().to(device)  # under the seed: the initial weights
        optimizer = recipe.build_optimizer(model.parameters())
        model, optimizer, scaler = mp.prepare(model, optimizer, policy)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: recipe.lr_factor(s, steps))
        execution = policy.resolve_execution(device)
        injector = FaultInjector(plan, model) if plan is not None else None

        history: list[Record] = []
        start, train_seconds = 0, 0.0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            set_rng_state(checkpoint["rng"])
            start, history = checkpoint["step"], checkpoint["history"]
            train_seconds = checkpoint["train_seconds"]
        else:
            record = {"kind": "eval", "step": 0, "metric": _evaluate(recipe, model, data)}
            history.append(record)
            log(record)
        # Several processes: the forward and backward run through DDP, which averages the gradients over
        # the ranks in backward. Everything else (evaluation, checkpoints) uses the inner model.
        net = model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        end = steps if stop_at is None else stop_at
        pending: list[tuple[Record, torch.Tensor]] = []  # step records waiting for their loss value

        def write_checkpoint(done: int) -> Path | None:
            """Checkpoint the run after step ``done`` into ``out``; its path (on rank 0, else None)."""
            path = None
            if rank == 0:  # replicas are equal: one writer, the inner (unwrapped) model's state
                path = save_checkpoint(out, {
                    "recipe": recipe.name, "policy": str(policy),
                    "seed": seed, "steps": steps, "step": done, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history,
                    "train_seconds": train_seconds,
                }, keep=keep)
            if world_size > 1:
                dist.barrier()  # no rank goes on (and no resume reads) before the checkpoint is whole
            return path

        for step in range(start, end):
            tick = time.perf_counter()
            batch = shard(data.batch(step, recipe.batch_size, seed), rank, world_size)
            net.train()
            # On the DDP wrapper, mp.autocast also registers mixprec's gradient communication hook (once).
            with mp.autocast(net), injector.forward(step + 1) if injector else contextlib.nullcontext():
                loss = recipe.loss(net, batch)
            if injector:
                loss = injector.loss(step + 1, loss)
            scaler.scale(loss).backward()
            if injector:
                injector.grads(step + 1)
            lr = optimizer.param_groups[0]["lr"]
            try:
                info = mp.step(optimizer, scaler, max_grad_norm=recipe.max_grad_norm,
                               max_skips_in_a_row=max_skips_in_a_row)
            except mp.NaNStormError as error:
                # Not applied, like the skipped steps before it: the weights, masters and optimizer state
                # are the last applied step's. Log the step, checkpoint that state, stop naming parameters.
                record = {"kind": "step", "step": step + 1, "loss": math.nan, "loss_scale": error.loss_scale,
                          "applied": False, "grad_norm": None, "lr": lr, "skipped_steps": error.skipped_steps}
                pending.append((record, loss.detach()))
                _flush(pending, history, log, world_size)
                path = write_checkpoint(step + 1) if out is not None else None
                raise error.named(model, step=step + 1, checkpoint=str(path) if path else None) from None
            if info.applied:
                scheduler.step()  # a skipped step must not advance the schedule
            optimizer.zero_grad()
            train_seconds += time.perf_counter() - tick

            record = {"kind": "step", "step": step + 1, "loss": math.nan, "loss_scale": info.loss_scale,
                      "applied": info.applied, "grad_norm": info.grad_norm, "lr": lr,
                      "skipped_steps": info.skipped_steps}
            pending.append((record, loss.detach()))
            done = step + 1
            evaluate_now = done % recipe.eval_every == 0 or done == steps
            periodic = bool(checkpoint_every) and done % checkpoint_every == 0
            checkpoint_now = out is not None and (done == end or periodic)
            # Before a checkpoint every pending record is flushed: its history holds every record to its step.
            if len(pending) >= LOG_EVERY or evaluate_now or checkpoint_now or done == end:
                _flush(pending, history, log, world_size)
            if evaluate_now:
                # Every rank evaluates the full test data (cheap, no collective); rank 0's value is logged.
                # (Replicas are equal but for BatchNorm running statistics, which each rank updates from
                # its own slice; DDP overwrites them with rank 0's before every forward.)
                record = {"kind": "eval", "step": done, "metric": _evaluate(recipe, model, data)}
                history.append(record)
                log(record)
            if checkpoint_now:
                write_checkpoint(done)

        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None  # the whole run's
        counted = _count_memory(recipe, net, model, optimizer, shard(data.batch(end - 1, recipe.batch_size, seed),
                                                                     rank, world_size))
        memory = dict(counted.formats)
        memory_source = "counted" if execution == "native" else "counted; emulated: policy's formats"
        if peak is not None:
            memory["peak (measured)"] = peak
            memory_source += "; CUDA peak measured"

    step_records = [r for r in history if r["kind"] == "step"]
    evals = [r for r in history if r["kind"] == "eval"]
    last = step_records[-1] if step_records else {"loss": math.nan, "loss_scale": math.nan, "skipped_steps": 0}
    return RunResult(
        recipe=recipe.name, policy=str(policy), seed=seed, steps=len(step_records), execution=execution,
        emulation=None if execution == "native" else policy.emulation,
        device=str(device), metric=recipe.metric, higher_is_better=recipe.higher_is_better,
        initial_metric=evals[0]["metric"], final_metric=evals[-1]["metric"], final_loss=last["loss"],
        skipped_steps=int(last["skipped_steps"]), final_loss_scale=last["loss_scale"],
        seconds_per_step=train_seconds / max(1, len(step_records)), memory=memory,
        memory_source=memory_source, data_info=dict(data.info), world_size=world_size, history=history,
        memory_held=dict(counted.held),
    )


def _evaluate(recipe: Recipe, model: torch.nn.Module, data: Data) -> float:
    """The recipe's metric, in eval mode, under the policy (what a deployed 16-bit model computes)."""
    model.eval()
    with torch.no_grad(), mp.autocast(model):
        value = float(recipe.evaluate(model, data))
    model.train()
    return value


def _no_log(record: Record) -> None:
    pass


def _flush(pending: list[tuple[Record, torch.Tensor]], history: list[Record], log: Log, world_size: int) -> None:
    losses = torch.stack([loss.float() for _, loss in pending])  # one read for many steps
    if world_size > 1:
        # Each rank's loss is the mean over its equal slice, so the mean over ranks is the global batch's
        # mean loss: the number a 1-process run logs. One collective per flush, for all its steps.
        dist.all_reduce(losses)
        losses /= world_size
    for (record, _), value in zip(pending, losses.tolist(), strict=True):
        record["loss"] = value
        history.append(record)
        log(record)
    pending.clear()


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
            "memory": runs[0].memory,
            "memory_source": runs[0].memory_source,
            "memory_held": runs[0].memory_held,
            "execution": runs[0].execution,
            "emulation": runs[0].emulation,
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
    data = recipe.make_data()
    runs = []
    for name in names:
        for seed in seed_list:
            run_log = None if log is None else (lambda record, n=name, s=seed: log(n, s, record))
            runs.append(train(recipe, name, seed=seed, steps=steps, data=data, device=device,
                              threads=threads, log=run_log))
    return Comparison(recipe.name, recipe.metric, recipe.higher_is_better, names, seed_list, runs,
                      recipe.description)


# ----- memory by category -----------------------------------------------------------------------------


def _count_memory(recipe: Recipe, net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batch: tuple[torch.Tensor, ...]) -> mp.MemoryReport:
    """`mp.memory` in the state a training step has between backward and update: one more batch's
    gradients (16-bit on the model and, with masters, FP32 on them) beside the parameters, masters and
    optimizer state, and the tensors one forward in train mode saves for backward (per process: its
    slice of a batch). Run after the last step, so the extra backward (through ``net``: under DDP every
    rank runs it) and forward change nothing the run reports; the gradients are cleared afterwards.
    """
    with mp.autocast(net):
        loss = recipe.loss(net, batch)
    loss.backward()  # unscaled: only the gradients' sizes are read
    del loss

    def forward() -> torch.Tensor:
        with mp.autocast(model):
            return recipe.loss(model, batch)

    counted = mp.memory(model, optimizer, run=forward)
    optimizer.zero_grad()
    return counted
