"""One training run's state and the phases that advance it, for `mixprec.harness.training.train`.

`RunSettings` holds what the run was asked to do; `RunState` holds what it trains and keeps (model,
optimizer with its masters, loss scaler, LR schedule, history, step, time) and advances it in phases,
which `train` calls in this order under the run's seed::

    run = RunState(settings, data, plan, log)  # model, optimizer, scaler, LR schedule, fault injector
    run.begin(checkpoint)                       # resume from a checkpoint, or evaluate at step 0
    run.train()                                 # the steps, their logging, evaluations and checkpoints
    memory = run.measure_memory()               # bytes by category after the last step

It uses only the public API (``import mixprec as mp``), like the loop it belongs to.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mixprec as mp
from mixprec.harness.checkpoints import save_checkpoint
from mixprec.harness.determinism import rng_state, set_rng_state
from mixprec.harness.faults import FaultInjector, FaultPlan
from mixprec.harness.processes import shard
from mixprec.recipes import Batch, Data, Recipe

LOG_EVERY = 10  # steps between reading losses back from the device (one extra sync per LOG_EVERY steps)

Record = dict[str, Any]
Log = Callable[[Record], None]


@dataclass(frozen=True)
class RunSettings:
    """What one run was asked to do: fixed from its set-up to its result."""

    recipe: Recipe
    policy: mp.Policy
    seed: int
    steps: int  # the run's total steps: the LR schedule spans them
    end: int  # the step this call stops after: ``steps``, or ``stop_at``
    device: torch.device
    rank: int
    world_size: int
    out: Path | None  # the run's folder for checkpoints; None: no checkpoints
    checkpoint_every: int | None  # None or 0: only at ``end`` (and in a NaN storm)
    keep: int  # checkpoints kept in ``out``
    max_skips_in_a_row: int | str | None  # mp.step's NaN-storm guard


def step_record(step: int, lr: float, loss_scale: float | torch.Tensor, applied: bool | torch.Tensor,
                grad_norm: float | torch.Tensor | None, skipped_steps: int | torch.Tensor) -> Record:
    """The history's record of one step; its loss is filled in when the pending losses are read back.

    The other values are `mp.StepInfo`'s (Python numbers: the loop's mp.step syncs)."""
    return {"kind": "step", "step": step, "loss": math.nan, "loss_scale": loss_scale, "applied": applied,
            "grad_norm": grad_norm, "lr": lr, "skipped_steps": skipped_steps}


class RunState:
    """One run's model, optimizer, loss scaler, LR schedule and history, and the phases that train them.

    Build it under the run's seed (`mixprec.harness.determinism.isolated_rng`): the initial weights are
    drawn here. ``log`` sees every record as the history gets it (pass a no-op on ranks other than 0).
    """

    def __init__(self, settings: RunSettings, data: Data, plan: FaultPlan | None, log: Log) -> None:
        recipe = settings.recipe
        self.settings, self.data, self.log = settings, data, log
        model = recipe.make_model().to(settings.device)  # under the seed: the initial weights
        optimizer = recipe.build_optimizer(model.parameters())
        self.model, prepared, self.scaler = mp.prepare(model, optimizer, settings.policy)
        assert prepared is not None  # given an optimizer, mp.prepare returns one
        self.optimizer: torch.optim.Optimizer = prepared
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: recipe.lr_factor(s, settings.steps))
        self.execution = settings.policy.resolve_execution(settings.device)
        self.injector = FaultInjector(plan, self.model) if plan is not None else None
        self.net: torch.nn.Module = self.model  # what the forward and backward run through (DDP's wrapper)
        self.history: list[Record] = []
        self.pending: list[tuple[Record, torch.Tensor]] = []  # step records waiting for their loss value
        self.start = 0  # the steps done before this call (resumed from a checkpoint)
        self.train_seconds = 0.0

    # ----- set-up and resume --------------------------------------------------------------------------

    def begin(self, checkpoint: dict[str, Any] | None) -> None:
        """Resume from ``checkpoint`` (`mixprec.harness.checkpoints.load_checkpoint`'s), or evaluate the
        initial weights (the record of step 0); then, under torchrun, wrap the model in DDP."""
        settings = self.settings
        if checkpoint is not None:
            self._resume(checkpoint)
        else:
            self._add({"kind": "eval", "step": 0, "metric": self._evaluate()})
        # Several processes: the forward and backward run through DDP, which averages the gradients over
        # the ranks in backward. Everything else (evaluation, checkpoints) uses the inner model.
        if settings.world_size > 1:
            cuda = settings.device.type == "cuda"
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[settings.device.index] if cuda else None)
        if settings.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(settings.device)

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        """Load everything a checkpoint holds: weights, optimizer, scaler, schedule, RNG, history, time."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        self.start, self.history = checkpoint["step"], checkpoint["history"]
        self.train_seconds = checkpoint["train_seconds"]

    # ----- the steps ----------------------------------------------------------------------------------

    def train(self) -> None:
        """Train from the step it began at up to ``settings.end``, logging, evaluating and checkpointing
        after the steps that call for it. Raises mp.NaNStormError (named, checkpointed) in a NaN storm."""
        for step in range(self.start, self.settings.end):
            self._train_step(step)
            self._after_step(step + 1)

    def _train_step(self, step: int) -> None:
        """Train on batch ``step`` (counted from 0; the step's record and faults count from 1)."""
        settings, recipe = self.settings, self.settings.recipe
        tick = time.perf_counter()
        batch = shard(self.data.batch(step, recipe.batch_size, settings.seed), settings.rank, settings.world_size)
        self.net.train()
        # On the DDP wrapper, mp.autocast also registers mixprec's gradient communication hook (once).
        with mp.autocast(self.net), self._forward_faults(step + 1):
            loss = recipe.loss(self.net, batch)
        if self.injector:
            loss = self.injector.loss(step + 1, loss)
        self.scaler.scale(loss).backward()
        if self.injector:
            self.injector.grads(step + 1)
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            info = mp.step(self.optimizer, self.scaler, max_grad_norm=recipe.max_grad_norm,
                           max_skips_in_a_row=settings.max_skips_in_a_row)
        except mp.NaNStormError as error:
            raise self._storm(error, step + 1, lr, loss) from None
        if info.applied:
            self.scheduler.step()  # a skipped step must not advance the schedule
        self.optimizer.zero_grad()
        self.train_seconds += time.perf_counter() - tick
        record = step_record(step + 1, lr, info.loss_scale, info.applied, info.grad_norm, info.skipped_steps)
        self.pending.append((record, loss.detach()))

    def _forward_faults(self, step: int) -> contextlib.AbstractContextManager[None]:
        """The fault injector's activation faults for ``step`` (nothing without an injector)."""
        return self.injector.forward(step) if self.injector else contextlib.nullcontext()

    def _storm(self, error: mp.NaNStormError, step: int, lr: float, loss: torch.Tensor) -> mp.NaNStormError:
        """Log the step a NaN storm stopped, checkpoint the last good state, and return the error to raise,
        naming the parameters, the step and the checkpoint.

        Not applied, like the skipped steps before it: the weights, masters and optimizer state are the
        last applied step's, so the current state is the one to save.
        """
        record = step_record(step, lr, error.loss_scale, False, None, error.skipped_steps)
        self.pending.append((record, loss.detach()))
        self._flush()
        path = self._write_checkpoint(step)
        return error.named(self.model, step=step, checkpoint=str(path) if path else None)

    # ----- evaluation and logging ---------------------------------------------------------------------

    def _after_step(self, done: int) -> None:
        """After step ``done``: read the pending losses back, evaluate and checkpoint where it is time."""
        settings = self.settings
        every = settings.checkpoint_every or 0
        evaluate_now = done % settings.recipe.eval_every == 0 or done == settings.steps
        periodic = bool(every) and done % every == 0
        checkpoint_now = settings.out is not None and (done == settings.end or periodic)
        # Before a checkpoint every pending record is flushed: its history holds every record to its step.
        if len(self.pending) >= LOG_EVERY or evaluate_now or checkpoint_now or done == settings.end:
            self._flush()
        if evaluate_now:
            # Every rank evaluates the full test data (cheap, no collective); rank 0's value is logged.
            # (Replicas are equal but for BatchNorm running statistics, which each rank updates from
            # its own slice; DDP overwrites them with rank 0's before every forward.)
            self._add({"kind": "eval", "step": done, "metric": self._evaluate()})
        if checkpoint_now:
            self._write_checkpoint(done)

    def _add(self, record: Record) -> None:
        """Append ``record`` to the history and log it."""
        self.history.append(record)
        self.log(record)

    def _evaluate(self) -> float:
        """The recipe's metric, in eval mode, under the policy (what a deployed 16-bit model computes)."""
        self.model.eval()
        with torch.no_grad(), mp.autocast(self.model):
            value = float(self.settings.recipe.evaluate(self.model, self.data))
        self.model.train()
        return value

    def _flush(self) -> None:
        """Read the pending steps' losses back (one read for many steps) and add their records."""
        losses = torch.stack([loss.float() for _, loss in self.pending])
        world_size = self.settings.world_size
        if world_size > 1:
            # Each rank's loss is the mean over its equal slice, so the mean over ranks is the global batch's
            # mean loss: the number a 1-process run logs. One collective per flush, for all its steps.
            dist.all_reduce(losses)
            losses /= world_size
        for (record, _), value in zip(self.pending, losses.tolist(), strict=True):
            record["loss"] = value
            self._add(record)
        self.pending.clear()

    # ----- checkpoints --------------------------------------------------------------------------------

    def _write_checkpoint(self, done: int) -> Path | None:
        """Checkpoint the run after step ``done`` into ``out``; its path (on rank 0, else None). Nothing
        without a run folder."""
        settings = self.settings
        if settings.out is None:
            return None
        path = None
        if settings.rank == 0:  # replicas are equal: one writer, the inner (unwrapped) model's state
            path = save_checkpoint(settings.out, self._checkpoint_state(done), keep=settings.keep)
        if settings.world_size > 1:
            dist.barrier()  # no rank goes on (and no resume reads) before the checkpoint is whole
        return path

    def _checkpoint_state(self, done: int) -> dict[str, Any]:
        """What a checkpoint after step ``done`` holds (`mixprec.harness.checkpoints.CHECKPOINT_KEYS`)."""
        settings = self.settings
        return {
            "recipe": settings.recipe.name, "policy": str(settings.policy),
            "seed": settings.seed, "steps": settings.steps, "step": done, "model": mp.fp32_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "history": self.history,
            "train_seconds": self.train_seconds,
        }

    # ----- memory -------------------------------------------------------------------------------------

    def measure_memory(self) -> tuple[dict[str, int], str, dict[str, int]]:
        """After the last step: (bytes in the policy's formats by category, where the numbers come from,
        bytes the tensors held by category); on CUDA the whole run's measured peak too."""
        settings = self.settings
        cuda = settings.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(settings.device) if cuda else None  # the whole run's
        batch = shard(self.data.batch(settings.end - 1, settings.recipe.batch_size, settings.seed),
                      settings.rank, settings.world_size)
        counted = count_memory(settings.recipe, self.net, self.model, self.optimizer, batch)
        memory = dict(counted.formats)
        source = "counted" if self.execution == "native" else "counted; emulated: policy's formats"
        if peak is not None:
            memory["peak (measured)"] = peak
            source += "; CUDA peak measured"
        return memory, source, dict(counted.held)


def count_memory(recipe: Recipe, net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batch: Batch) -> mp.MemoryReport:
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
