"""One training run's state and the phases that advance it, for `mixprec.harness.training.train`.

`RunSettings` holds what the run was asked to do; `RunState` holds what it trains and keeps (model,
optimizer with its masters, loss scaler, LR schedule, history, step, time) and advances it in phases,
which `train` calls in this order under the run's seed::

    run = RunState(settings, data, plan, log)  # model, optimizer, scaler, LR schedule, fault injector
    run.begin(checkpoint, path)                 # resume from a checkpoint, or evaluate at step 0
    run.train()                                 # the steps, their logging, evaluations and checkpoints
    memory = run.measure_memory()               # bytes by category after the last step

No state with inf/NaN weights is checkpointed: the weights (their FP32 view, masters included) are
checked whenever the losses are read back (every LOG_EVERY steps, in the same transfer) and before each
checkpoint, and a run whose weights went non-finite stops (`NonFiniteWeightsError`) naming the newest
checkpoint that holds finite ones. So the checkpoints a run keeps are all finite, and the last finite one
is never rotated away by non-finite ones.

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
from mixprec.harness.checkpoints import checkpoint_path, save_checkpoint
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
    faults: str | None = None  # the fault plan's text (recorded in checkpoints: a resume must inject the same)
    data_sha256: str | None = None  # the data's checksum (recorded in checkpoints: a resume must have the same)


def step_record(step: int, lr: float, loss_scale: float | torch.Tensor, applied: bool | torch.Tensor,
                grad_norm: float | torch.Tensor | None, skipped_steps: int | torch.Tensor) -> Record:
    """The history's record of one step; its loss is filled in when the pending losses are read back.

    The other values are `mp.StepInfo`'s (Python numbers: the loop's mp.step syncs)."""
    return {"kind": "step", "step": step, "loss": math.nan, "loss_scale": loss_scale, "applied": applied,
            "grad_norm": grad_norm, "lr": lr, "skipped_steps": skipped_steps}


class NonFiniteWeightsError(mp.NaNStormError):
    """The weights hold inf/NaN although no step was skipped for it: steps with finite gradients were applied
    to weights the optimizer made non-finite (a learning rate of nan, an optimizer dividing by zero), and
    would have been forever. ``weights``: ``{name: "inf" | "nan" | "inf, nan"}``; ``since``: the last step
    they were seen finite; ``checkpoint``: the newest checkpoint holding finite weights, if any."""

    def __init__(self, weights: dict[str, str], step: int, since: int, checkpoint: str | None,
                 loss_scale: float, skipped_steps: int) -> None:
        self.reason, self.skipped_in_a_row, self.skipped_steps = "weights", 0, skipped_steps
        self.loss_scale = loss_scale
        self.gradients, self.weights, self.step, self.since, self.checkpoint = {}, weights, step, since, checkpoint
        self._args = ("weights", 0, skipped_steps, loss_scale, [])
        RuntimeError.__init__(self, self._message())

    def named(self, model: torch.nn.Module, step: int | None = None,
              checkpoint: str | None = None) -> NonFiniteWeightsError:
        return self  # named already

    def _message(self) -> str:
        names = ", ".join(f"{k}: {v}" for k, v in list(self.weights.items())[:6]) + (
            f" and {len(self.weights) - 6} more" if len(self.weights) > 6 else "")
        saved = (f"the last good state is saved in {self.checkpoint}" if self.checkpoint else
                 "nothing is saved: no checkpoint of this run with finite weights exists")
        return (f"the weights of {names} hold inf/NaN after step {self.step} (finite after step {self.since}), "
                f"and steps with finite gradients would go on being applied to them: stopped. A learning rate of "
                f"nan or inf, or an optimizer dividing by zero, makes such weights from finite gradients; {saved}")


class RunState:
    """One run's model, optimizer, loss scaler, LR schedule and history, and the phases that train them.

    Build it under the run's seed (`mixprec.harness.determinism.isolated_rng`): the initial weights are
    drawn here. ``log`` sees every record as the history gets it (pass a no-op on ranks other than 0).
    """

    def __init__(self, settings: RunSettings, data: Data, plan: FaultPlan | None, log: Log) -> None:
        recipe = settings.recipe
        if recipe.batch_size > data.train_size:  # found before anything runs (or an overwrite removes the old run)
            raise ValueError(f"recipe {recipe.name!r} has batch_size {recipe.batch_size}, larger than its training "
                             f"set ({data.train_size} rows); give it a batch_size <= {data.train_size}, or more data")
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
        self.last_finite: Path | None = None  # the newest checkpoint with finite weights and masters
        self.finite_at = 0  # the last step after which the weights were seen finite
        self.readable: dict[str, bool] = {}  # checkpoint file name -> whether it loads (for the rotation)
        self.weight_names = {name for name, _ in self.model.named_parameters()}  # checked: not buffers

    # ----- set-up and resume --------------------------------------------------------------------------

    def begin(self, checkpoint: dict[str, Any] | None, path: Path | None = None) -> None:
        """Resume from ``checkpoint`` (`mixprec.harness.checkpoints.load_checkpoint`'s, read from ``path``), or
        evaluate the initial weights (the record of step 0); then, under torchrun, wrap the model in DDP."""
        settings = self.settings
        if checkpoint is not None:
            self._resume(checkpoint)
            self.finite_at = self.start
            if path is not None:
                self.readable[path.name] = True
                self.last_finite = None if nonfinite_weights(checkpoint, self.weight_names) else path
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
        last applied step's, so the current state is the one to save, if its weights and masters are
        finite; if not (mp.step found them inf/NaN), nothing is saved and the error names the newest
        checkpoint that holds finite ones.
        """
        record = step_record(step, lr, error.loss_scale, False, None, error.skipped_steps)
        self.pending.append((record, loss.detach()))
        self._flush(step, check_weights=False)
        finite = not error.weights and not self._nonfinite()
        path = self._write_checkpoint(step) if finite else self.last_finite
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
            self._flush(done)
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

    def _flush(self, done: int, check_weights: bool = True) -> None:
        """Read the pending steps' losses back (one read for many steps) and add their records; in the same
        read, whether the weights are finite: if not, raise `NonFiniteWeightsError` (after the records)."""
        values = [loss.float().reshape(()) for _, loss in self.pending]
        if check_weights:  # how many weights (FP32 view: masters where there are) hold inf/NaN
            weights = [t for k, t in mp.fp32_state_dict(self.model).items() if k in self.weight_names]
            values.append(torch.stack([(~torch.isfinite(t)).any() for t in weights]).sum().float().to(values[0]))
        read = torch.stack(values)
        world_size = self.settings.world_size
        if world_size > 1:
            # Each rank's loss is the mean over its equal slice, so the mean over ranks is the global batch's
            # mean loss: the number a 1-process run logs. One collective per flush, for all its steps.
            dist.all_reduce(read)
            read[: len(self.pending)] /= world_size
        numbers = read.tolist()
        for (record, _), value in zip(self.pending, numbers, strict=False):
            record["loss"] = value
            self._add(record)
        self.pending.clear()
        if check_weights and numbers[-1] != 0:
            raise self._weights_error(done)
        if check_weights:
            self.finite_at = done

    def _weights_error(self, done: int, bad: dict[str, str] | None = None) -> NonFiniteWeightsError:
        """The error stopping a run whose weights went non-finite with finite gradients (no checkpoint)."""
        last = next((r for r in reversed(self.history) if r["kind"] == "step"), {})
        where = str(self.last_finite) if self.last_finite else None
        return NonFiniteWeightsError(bad or self._nonfinite(), done, self.finite_at, where,
                                     float(last.get("loss_scale", math.nan)), int(last.get("skipped_steps", 0)))

    def _nonfinite(self) -> dict[str, str]:
        """The weights (FP32 view) holding inf/NaN now, by name (a cold path: reads them to the host)."""
        return nonfinite_weights({"model": mp.fp32_state_dict(self.model)}, self.weight_names)

    # ----- checkpoints --------------------------------------------------------------------------------

    def _write_checkpoint(self, done: int) -> Path | None:
        """Checkpoint the run after step ``done`` into ``out``; its path (on rank 0, else None). Nothing
        without a run folder."""
        settings = self.settings
        if settings.out is None:
            return None
        path = None
        if settings.rank == 0:  # replicas are equal: one writer, the inner (unwrapped) model's state
            state = self._checkpoint_state(done)
            bad = nonfinite_weights(state, self.weight_names)
            if bad:  # never saved as a good state, nor rotating a finite one away
                raise self._weights_error(done, bad)
            try:
                path = save_checkpoint(settings.out, state, keep=settings.keep, readable=self.readable)
            except OSError as error:  # a full disk: its temporary file is removed, the older checkpoints intact
                if error.filename is None:  # a failed write names no file: name the checkpoint it was to be
                    raise OSError(error.errno, error.strerror, str(checkpoint_path(settings.out, done))) from None
                raise
            self.last_finite = path
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
            "train_seconds": self.train_seconds, "faults": settings.faults,
            "max_skips_in_a_row": settings.max_skips_in_a_row, "data_sha256": settings.data_sha256,
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


def nonfinite_weights(state: dict[str, Any], names: set[str] | None = None) -> dict[str, str]:
    """``{name: "inf" | "nan" | "inf, nan"}`` for the weights of a checkpoint state's ``model`` (the FP32
    view; the entries in ``names`` if given: the parameters, not buffers such as BatchNorm's statistics)
    and its optimizer's FP32 ``masters`` (named ``masters[i]``) that hold inf/NaN."""
    tensors = {k: t for k, t in state.get("model", {}).items() if names is None or k in names}
    masters = state.get("optimizer", {}).get("masters", []) if isinstance(state.get("optimizer"), dict) else []
    tensors.update({f"masters[{i}]": t for i, t in enumerate(masters)})
    found = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            found[name] = ", ".join(k for k, f in (("inf", torch.isinf), ("nan", torch.isnan)) if bool(f(t).any()))
    return found


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
