"""The one ordered training step: unscale + check -> clip -> one host sync -> update -> scale update.

Getting the order wrong is the classic mixed precision bug: clipping scaled gradients clips by the
wrong norm, applying weight decay before unscaling decays by the wrong amount, stepping on an inf
gradient destroys the weights, and stepping an LR scheduler on a skipped step shifts the schedule.
`step` does the whole sequence in one place and tells the caller whether the update was applied:

1. gather the gradients the optimizer steps on (the FP32 master grads for `MasterWeights`, the
   parameters' own grads for a plain optimizer);
2. unscale them in place and check for inf/NaN, in one fused pass (``scaler.unscale_and_check_``);
3. clip, on the unscaled gradients, only if they are finite (a masked clip coefficient, no sync);
4. read the found-inf flag, the gradient norm, the loss scale and the skipped-step count to the host
   in ONE transfer: the step's only host sync (with several ranks, the agreement on found-inf goes
   right before it);
5. step the optimizer if the gradients were finite; otherwise leave every parameter, master and
   optimizer state tensor untouched;
6. update the loss scale (tensor ops) and let the scaler warn or raise at its floor.

With ``sync=False`` step 4 goes: the optimizer (torch's ``fused=True`` ones) gets the found-inf flag
and skips on the device by itself, and `StepInfo` holds device tensors, read when the caller wants.

Two guards end a run that skipping cannot save, with a `NaNStormError` naming the parameters: a NaN
storm (``max_skips_in_a_row`` skipped steps in a row: a NaN loss, an inf activation or bad data, which
no loss scale fixes), and weights that hold inf/NaN (checked on the step after a skipped one, read in
the same sync: every later gradient would be inf/NaN too). Clean steps pay nothing for them.

Example:
    >>> import torch, mixprec as mp
    >>> model = torch.nn.Linear(3, 1)
    >>> opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), mp.StaticScaler(2.0**8)
    >>> scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    >>> info = mp.step(opt, scaler, max_grad_norm=1.0)
    >>> info.applied, info.loss_scale, round(info.grad_norm, 4)
    (True, 256.0, 4.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .master import MasterWeights, managed
from .scaling import LossScaler, find_nonfinite, group_by_device_and_dtype
from .state import is_dtensor

__all__ = ["StepInfo", "step", "unscale_", "NaNStormError"]


@dataclass(frozen=True)
class StepInfo:
    """What one `step` did.

    Attributes:
        applied: the optimizer stepped (gradients were finite). Step LR schedulers, EMAs and counters
            only when True.
        loss_scale: the loss scale this step's gradients were scaled by.
        grad_norm: total L2 norm of the unscaled gradients (inf/NaN on an overflow), or None when no
            clipping was asked for (pass ``max_grad_norm=float("inf")`` to measure without clipping).
        skipped_steps: steps skipped so far by this scaler, this one included.
        nonfinite: on a skipped step, the parameters whose gradients held inf/NaN on this rank, as
            ``{"#i (shape 64x32)": "inf" | "nan" | "inf, nan"}`` (i: position among the optimizer's
            parameters; `named` gives model names); ``{}`` when none did (the norm overflowed, or another
            rank's gradients did); None on an applied step (nothing is read for it).

    After ``mp.step(..., sync=False)``, ``applied``, ``loss_scale``, ``grad_norm`` and ``skipped_steps``
    are 0-dim tensors on the device (``bool(info.applied)`` reads one, and syncs), ``nonfinite`` is None.
    """

    applied: bool | torch.Tensor
    loss_scale: float | torch.Tensor
    grad_norm: float | torch.Tensor | None
    skipped_steps: int | torch.Tensor = 0
    nonfinite: dict[str, str] | None = None
    _params: tuple = field(default=(), repr=False, compare=False)

    def named(self, model: torch.nn.Module) -> dict[str, str] | None:
        """`nonfinite` with the parameters named as in `model`.

        Example:
            >>> import torch, mixprec as mp
            >>> model = torch.nn.Linear(2, 1)
            >>> model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.tensor([float("inf")])
            >>> info = mp.step(torch.optim.SGD(model.parameters(), lr=0.1), mp.NoScaler())
            >>> info.applied, info.nonfinite, info.named(model)
            (False, {'#1 (shape 1)': 'inf'}, {'bias': 'inf'})
        """
        if self.nonfinite is None:
            return None
        names = {id(p): name for name, p in model.named_parameters()}
        return {names.get(id(p), label): kinds for (label, kinds), p in zip(self.nonfinite.items(), self._params,
                                                                            strict=True)}


class NaNStormError(RuntimeError):
    """`step` stopped a run whose steps keep being skipped, where skipping cannot end it.

    Raised when ``max_skips_in_a_row`` steps in a row had inf/NaN gradients (``reason="storm"``), or as
    soon as the weights themselves hold inf/NaN (``reason="weights"``; every later gradient would too).
    The step that raises was not applied: parameters, masters and optimizer state are those of the last
    applied step, the last good state.

    Attributes:
        reason: ``"storm"`` or ``"weights"``.
        skipped_in_a_row: consecutive skipped steps, the one that raised included.
        skipped_steps: steps the scaler skipped in all.
        loss_scale: the scale the last step's gradients were scaled by.
        gradients: ``{parameter: "inf" | "nan" | "inf, nan"}`` for the gradients that held them.
        weights: the same for the weights (FP32 masters, where a parameter has one).
        step: the training step, where the caller told it (`named`).
        checkpoint: where the caller saved the last good state, if it did (`named`).

    Parameters are labelled ``"#i (shape 64x32)"`` (i: position among the optimizer's parameters) until
    `named` gives them their names in a model.

    Example:
        >>> import mixprec as mp
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> p.grad = torch.tensor([float("nan"), 1.0])
        >>> try:
        ...     step(torch.optim.SGD([p], lr=0.1), mp.NoScaler(), max_skips_in_a_row=1)
        ... except NaNStormError as error:
        ...     print(error.gradients, error.loss_scale)
        {'#0 (shape 2)': 'nan'} 1.0
    """

    def __init__(self, reason: str, skipped_in_a_row: int, skipped_steps: int, loss_scale: float,
                 found: list[tuple[str, int, torch.Tensor, str]], names: dict[int, str] | None = None,
                 step: int | None = None, checkpoint: str | None = None) -> None:
        self._args = (reason, skipped_in_a_row, skipped_steps, loss_scale, found)
        self.reason, self.skipped_in_a_row, self.skipped_steps = reason, skipped_in_a_row, skipped_steps
        self.loss_scale, self.step, self.checkpoint = loss_scale, step, checkpoint
        labels = [(names or {}).get(id(p)) or _label(i, p) for _, i, p, _ in found]
        self.gradients, self.weights = ({label: kinds for (w, _, _, kinds), label in zip(found, labels, strict=True)
                                         if w == where} for where in ("gradients", "weights"))
        super().__init__(self._message())

    def named(self, model: torch.nn.Module, step: int | None = None, checkpoint: str | None = None) -> NaNStormError:
        """The same error, with the parameters named as in ``model`` (and the step and checkpoint, if given).

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> error = NaNStormError("storm", 50, 50, 1.0, [("gradients", 1, model.bias, "nan")])
            >>> error.gradients, error.named(model, step=120).gradients
            ({'#1 (shape 1)': 'nan'}, {'bias': 'nan'})
        """
        names = {id(p): name for name, p in model.named_parameters()}
        return NaNStormError(*self._args, names, self.step if step is None else step, checkpoint or self.checkpoint)

    def _message(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.reason == "weights":
            text = (f"the weights of {_listed(self.weights)} hold inf/NaN{at}: every later step would be skipped "
                    f"(their gradients are inf/NaN too). Something other than a step wrote them (a NaN written "
                    f"into a master weight, say), or the optimizer made them from finite gradients (e.g. Adam "
                    f"with eps=0): restore the last good checkpoint")
        else:
            grads = _listed(self.gradients) or "none on the parameters (the unscaled values or their norm overflowed)"
            weights = f"; weights with inf/NaN: {_listed(self.weights)}" if self.weights else "; the weights are finite"
            text = (f"NaN storm{at}: {self.skipped_in_a_row} steps in a row were skipped (loss scale "
                    f"{self.loss_scale:g}, {self.skipped_steps} skipped in all); inf/NaN gradients in {grads}"
                    f"{weights}. A loss scale does not fix this: look for a NaN loss, an inf activation or bad "
                    f"data in these steps (or pass max_skips_in_a_row=None to mp.step to keep skipping)")
        return text + (f". The last good state is saved in {self.checkpoint}" if self.checkpoint else "")


def _label(i: int, p: torch.Tensor) -> str:
    return f"#{i} (shape {'x'.join(map(str, p.shape)) or '()'})"


def _listed(found: dict[str, str], most: int = 6) -> str:
    items = [f"{label}: {kinds}" for label, kinds in found.items()]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _group_size(group: Any) -> int:
    """Ranks in `group` (the world by default); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(f"mp.step takes an optimizer or a list of optimizers (those mp.prepare returned), "
                        f"got {optimizer!r}")
    return optimizers


def _gather_grads(optimizers: list[torch.optim.Optimizer], ranks: int) -> tuple[list[torch.Tensor], list[bool]]:
    """The gradients the optimizers step on, as local tensors, and whether each is a shard (FSDP2)."""
    local: list[torch.Tensor] = []
    sharded: list[bool] = []
    for optimizer in optimizers:
        if isinstance(optimizer, MasterWeights):
            # Across ranks, an FP32 gradient is used only where mixprec's DDP hook reduced it (equal on
            # every rank); anything else (a reduction mixprec did not see) is read from param.grad.
            grads = optimizer.collect_grads_(trust_fp32=ranks == 1)
            local += grads
            sharded += [False] * len(grads)  # FP32 masters are plain tensors (FSDP2 keeps its own)
            continue
        params = [p for group in optimizer.param_groups for p in group["params"]]
        refused = managed(params)
        if refused:
            p = params[refused[0]]
            raise RuntimeError(
                f"mp.step got a plain {type(optimizer).__name__} over parameter #{refused[0]} (shape "
                f"{tuple(p.shape)}) and {len(refused) - 1} more that mp.prepare stored in 16 bits: it would "
                f"train them without FP32 masters (or off their format's grid). Build one optimizer over "
                f"every parameter before prepare (param groups can differ in lr and weight decay) and step "
                f"the one prepare returns: model, optimizer, scaler = mp.prepare(model, optimizer, policy)")
        for g in (p.grad for p in params if p.grad is not None):
            shard = is_dtensor(g)
            local.append(g.to_local() if shard else g)
            sharded.append(shard and any(p.is_shard() for p in g.placements))
    return local, sharded


def _read_together(values: list[torch.Tensor]) -> list[float]:
    """One device->host transfer for several 0-dim tensors. float64 keeps integer counts exact."""
    device = values[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.stack([v.to(device=device, dtype=dtype) for v in values]).tolist()


def _summed(g: torch.Tensor) -> torch.Tensor:
    """A gradient's values, a sparse one's summed over duplicate indices (what its norm is taken of)."""
    return g.coalesce()._values() if g.is_sparse else g


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of several tensors, as torch.nn.utils.get_total_norm computes it (0 for none)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).to(device)


def _agree(found_inf: torch.Tensor, shard_sq: torch.Tensor | None, bad_weights: torch.Tensor | None,
           group: Any) -> tuple[torch.Tensor, Any, Any]:
    """Sum the found-inf flags (any rank's overflow skips every rank), the sharded squared norms and the
    non-finite-weights flags (a shard's NaN stops every rank) over `group`, in one collective."""
    zero = torch.zeros_like(found_inf.float())
    packed = torch.stack([found_inf.float()] + [zero if t is None else t.to(zero.device, torch.float32)
                                                for t in (shard_sq, bad_weights)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return torch.clamp(packed[0], max=1.0), packed[1], packed[2]


def _weights(optimizers: list[torch.optim.Optimizer]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(position, model parameter, tensor the optimizer steps: its master or itself) for each parameter."""
    found: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for opt in optimizers:
        stepped = [t for group in opt.param_groups for t in group["params"]]
        models = opt.model_params if isinstance(opt, MasterWeights) else stepped
        found += [(len(found) + i, p, t) for i, (p, t) in enumerate(zip(models, stepped, strict=True))]
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _diagnose(optimizers: list[torch.optim.Optimizer], grads: list[torch.Tensor],
              weights_too: bool = True) -> list[tuple[str, int, Any, str]]:
    """Which gradients (and weights) hold inf/NaN, by parameter (cold path: it reads values to the host).
    Run before the step releases the FP32 gradients: `grads` line up with the stepped tensors that have one."""
    weights = _weights(optimizers)
    checks = [("gradients", [(i, p) for i, p, t in weights if t.grad is not None], grads)]
    if weights_too:
        checks.append(("weights", [(i, p) for i, p, _ in weights], [_local(t) for _, _, t in weights]))
    found = []
    for where, owners, tensors in checks:
        flags = find_nonfinite(tensors).tolist() if tensors else []
        for (i, p), t, bad in zip(owners, tensors, flags, strict=True):
            if bad:
                kinds = [k for k, f in (("inf", torch.isinf), ("nan", torch.isnan)) if bool(f(t).any())]
                found.append((where, i, p, ", ".join(kinds)))
    return found


def _skip_limit(value: Any, scaler: LossScaler) -> int | None:
    if isinstance(value, str) and value == "auto":
        return scaler.storm_limit()
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_skips_in_a_row must be an integer >= 1, 'auto' (the scaler's storm_limit(), "
                         f"{scaler.storm_limit()} here) or None (never stop), got {value!r}")
    return value


def _clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float, found_inf: torch.Tensor) -> None:
    """Clip ``grads`` in place by ``max_norm / (norm + 1e-6)`` (clamped to 1) unless ``found_inf``.

    The same arithmetic as torch.nn.utils.clip_grad_norm_, on gradient tensors rather than parameters.
    With an overflow the norm is inf/NaN; replacing it by 0 makes the coefficient exactly 1, so the
    gradients are left as they are, no sync.
    """
    masked = torch.where(found_inf.to(norm.device) != 0, torch.zeros_like(norm), norm)
    coef = torch.clamp(max_norm / (masked + 1e-6), max=1.0)
    for (device, _), group in group_by_device_and_dtype(grads).items():  # a sparse gradient: its values
        torch._foreach_mul_(group, coef.to(device))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return optimizer.optimizer if isinstance(optimizer, MasterWeights) else optimizer


def _check_skips_on_device(optimizers: list[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        # torch sets this on optimizers whose step reads `found_inf` (its fused=True Adam, AdamW, SGD, Adagrad).
        if not getattr(_inner(opt), "_step_supports_amp_scaling", False):
            raise ValueError(
                f"mp.step(..., sync=False) needs optimizers that skip an overflowing step on the device, "
                f"got {type(_inner(opt)).__name__} without that: build it with fused=True (torch's Adam, "
                f"AdamW, SGD and Adagrad have it), or leave sync=True (one host read per step)")


def _skips_on_device(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether every parameter with a gradient already has its optimizer state: a first step is synced.

    A skipped first step must leave no state behind, and torch's fused SGD, skipping its first step on
    the device, leaves its momentum buffers uninitialised (garbage in every later step).
    """
    unsure = [opt for opt in map(_inner, optimizers)  # every parameter with state: no need to look one by one
              if len(opt.state) < sum(len(group["params"]) for group in opt.param_groups)]
    return all(p.grad is None or p in opt.state for opt in unsure for group in opt.param_groups
               if not (isinstance(opt, torch.optim.SGD) and group["momentum"] == 0)  # SGD without momentum: no state
               for p in group["params"])


def _step_on_device(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step `optimizer`, which updates nothing (parameters, state, step counts) where found_inf != 0."""
    inner = _inner(optimizer)
    inner.found_inf, inner.grad_scale = found_inf, None  # how torch.amp.GradScaler hands them over
    try:
        optimizer.step()
    finally:
        del inner.found_inf, inner.grad_scale


def _grads_to_step(optimizers: list[torch.optim.Optimizer], scaler: LossScaler,
                    ranks: int) -> tuple[list[torch.Tensor], list[bool]]:
    """The gradients `_gather_grads` finds, refusing a step with none (and a second step on the same ones)."""
    scaler.check_not_stepped()
    found = _gather_grads(optimizers, ranks)
    if not found[0]:
        raise RuntimeError(
            "mp.step found no gradients: call scaler.scale(loss).backward() before mp.step "
            "(and optimizer.zero_grad() after it, not before)")
    return found


def _publish(optimizers: list[torch.optim.Optimizer], settled: bool = True) -> None:
    for opt in optimizers:
        if isinstance(opt, MasterWeights):
            opt.publish_grads_(settled)


def unscale_(optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], scaler: LossScaler) -> None:
    """Divide this backward's gradients by the loss scale now, in place, before `step`: torch.amp's
    ``GradScaler.unscale_``, for clipping or reading ``p.grad`` by hand.

    ``p.grad`` (and the FP32 gradients of `MasterWeights`) then hold the true gradients; edit them as
    usual (``clip_grad_norm_(model.parameters(), 1.0)``, masks), then call ``mp.step(optimizer, scaler)``
    with the same optimizers: it uses the edited gradients, does not unscale them again, and skips the
    step if they overflowed before unscaling (found here). ``mp.step(..., max_grad_norm=...)`` clips
    without this call, in FP32.

    Raises:
        RuntimeError: called twice for one backward, or with no gradients (see `step`).

    Syncs: no.

    Example:
        >>> import torch, mixprec as mp
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> opt, scaler = torch.optim.SGD(model.parameters(), lr=1.0), mp.StaticScaler(8.0)
        >>> scaler.scale(model(torch.ones(1, 2) * 3).sum()).backward()
        >>> mp.unscale_(opt, scaler); model.weight.grad.tolist()
        [[3.0, 3.0]]
        >>> norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        >>> mp.step(opt, scaler).applied, [round(g, 4) for g in model.weight.grad[0].tolist()]
        (True, [0.7071, 0.7071])
    """
    optimizers = _optimizers(optimizer)
    if scaler.take_unscaled(optimizers, peek=True) is not None:
        raise RuntimeError("mp.unscale_ was already called for this backward: call mp.step next")
    grads, _ = _grads_to_step(optimizers, scaler, _group_size(None))
    scaler.keep_unscaled(optimizers, scaler.unscale_and_check_(grads))
    _publish(optimizers, settled=False)  # the step settles them again: they may be edited in between


def step(  # noqa: C901, PLR0915
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scaler: LossScaler,
    max_grad_norm: float | None = None,
    group: Any = None,
    max_skips_in_a_row: int | str | None = "auto",
    sync: bool = True,
) -> StepInfo:
    """Unscale and check the gradients, clip them, step the optimizer unless they overflowed, update
    the loss scale.

    Args:
        optimizer: a `MasterWeights` or any plain ``torch.optim.Optimizer``; or a list of them when several
            optimizers share one backward (e.g. Muon for matrices + AdamW for the rest): they are
            checked, clipped (by their joint norm) and skipped together, and the scale updates once.
        scaler: the `LossScaler` whose ``scale(loss)`` was backpropagated (NoScaler for none).
        max_grad_norm: clip the unscaled gradients to this total L2 norm (``None``: no clipping).
        group: the process group whose ranks must agree (default: the world, when torch.distributed is
            initialised). Every rank skips when any rank's gradients overflowed, and the norm of
            sharded (FSDP2) gradients is summed over the ranks. Every rank of the group must call step.
        max_skips_in_a_row: raise `NaNStormError` when this many steps in a row were skipped: ``"auto"``
            (``scaler.storm_limit()``: 52 for the default DynamicScaler, more than its back-off from the
            ceiling to the floor takes; 50 for a fixed scale), an integer >= 1, or None (skip forever).
        sync: False reads nothing to the host: an overflowing step is skipped on the device by the
            optimizers themselves (torch's ``fused=True`` optimizers; others are refused), and `StepInfo`
            holds 0-dim device tensors (reading one syncs). A step where some parameter with a gradient
            has no optimizer state yet (the first step) is synced all the same. The NaN-storm guard and
            the scaler's floor check run only on synced steps (the run of skips is counted on the
            device): e.g. ``sync=i % 100 == 0`` checks every 100 steps.

    Returns:
        `StepInfo`: whether the update was applied, the loss scale used, the gradient norm.

    Raises:
        RuntimeError: no parameter has a gradient (backward was not called since ``zero_grad``); step
            was already called since the last ``scaler.scale(loss)`` (a second update from the same
            gradients, or one optimizer stepped after the scale changed: pass them all at once); or a
            plain optimizer steps parameters that mp.prepare gave FP32 masters (built after prepare).
        NaNStormError: ``max_skips_in_a_row`` skipped steps in a row, or weights holding inf/NaN.

    Syncs: yes, exactly once: found-inf, gradient norm, loss scale and skipped-step counts (and, on the
    step after a skipped one, whether the weights are finite) are read together in one transfer; none
    with ``sync=False`` (past the first step). (The
    optimizer's own step may add syncs of its own, as without mixprec.) With several ranks, one
    all-reduce of three numbers comes right before that read. A skipped step reads more to fill
    `StepInfo.nonfinite` (which parameters), and so does a `NaNStormError`; applied steps never do.

    Example:
        >>> import torch, mixprec as mp
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt, scaler = torch.optim.SGD([p], lr=1.0), mp.DynamicScaler(init_scale=4.0, hysteresis=1)
        >>> p.grad = torch.tensor([float("inf"), 4.0])
        >>> info = mp.step(opt, scaler)
        >>> info.applied, info.loss_scale, scaler.loss_scale, p.tolist()
        (False, 4.0, 2.0, [1.0, 1.0])
        >>> q = torch.nn.Parameter(torch.ones(2))
        >>> q.grad = torch.tensor([1.0, 2.0])  # as scaled by 2
        >>> info = mp.step(torch.optim.SGD([q], lr=0.5, fused=True), mp.StaticScaler(2.0), sync=False)
        >>> info.applied, q.tolist()  # a device tensor: read when wanted
        (tensor(True), [0.75, 0.5])
    """
    if not isinstance(scaler, LossScaler):
        raise TypeError(f"mp.step takes the LossScaler mp.prepare returned (or mp.NoScaler()), got "
                        f"{type(scaler).__name__} {scaler!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))):
        raise TypeError(f"max_grad_norm must be a number > 0 or None, got {type(max_grad_norm).__name__} "
                        f"{max_grad_norm!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be True or False, got {type(sync).__name__} {sync!r}")
    optimizers = _optimizers(optimizer)
    if not sync:
        _check_skips_on_device(optimizers)
    limit = _skip_limit(max_skips_in_a_row, scaler)
    ranks = _group_size(group)
    # 1. Unscale + check, fused; grads are FP32 masters' grads when MasterWeights is used. After
    # mp.unscale_ they are unscaled already (and maybe clipped by hand): gathered again, not unscaled twice.
    unscaled = scaler.take_unscaled(optimizers)  # found-inf of an mp.unscale_ for this backward, or None
    grads, sharded = _grads_to_step(optimizers, scaler, ranks)
    found_inf = scaler.unscale_and_check_(grads) if unscaled is None else unscaled
    scaler.mark_stepped()  # unscaled in place: this step has consumed them (optimizer.step() may now run)

    # 2. Agree across ranks (one collective), then clip the unscaled gradients if they are finite.
    device = found_inf.device
    # After a skipped step, also check that the weights are finite (a NaN weight makes every later step
    # skip); read with the one sync below, so clean steps pay nothing.
    bad_weights = None
    if scaler.known_skipped_in_a_row != 0 and sync:  # None: steps with sync=False ran since the last read
        local = [_local(t) for _, _, t in _weights(optimizers)]
        bad_weights = find_nonfinite(local).any().float().to(device) if local else None
    norm = None
    if max_grad_norm is not None:
        # In FP32: a 16-bit norm overflows long before the gradients do (a plain optimizer over
        # 16-bit parameters steps 16-bit grads).
        shards = [_summed(g).float() for g, s in zip(grads, sharded, strict=True) if s]
        replicas = [_summed(g).float() for g, s in zip(grads, sharded, strict=True) if not s]
        shard_sq = _norm(shards, device) ** 2 if shards else None
        replica_norm = _norm(replicas, device)
    if ranks > 1:
        found_inf, shard_sq_total, bad_total = _agree(
            found_inf, shard_sq if max_grad_norm is not None else None, bad_weights, group)
        bad_weights = None if bad_weights is None else bad_total
    if max_grad_norm is not None:
        if any(sharded):
            total_sq = shard_sq_total if ranks > 1 else shard_sq
            norm = torch.sqrt(total_sq + replica_norm**2)
        else:
            norm = replica_norm
        # A norm that overflows FP32 while every gradient is finite cannot clip (its coefficient is 0):
        # skip the step as for an overflow instead of zeroing the gradients and stepping on.
        found_inf = torch.maximum(found_inf, (~torch.isfinite(norm)).to(found_inf.device, found_inf.dtype))
        _clip_(grads, norm, max_grad_norm, found_inf)
    _publish(optimizers)  # param.grad unscaled (and clipped) too, as torch.amp leaves it

    if not sync and _skips_on_device(optimizers):
        # No host read: the optimizers skip an overflowing step themselves, on the device.
        loss_scale_now = scaler.scale_tensor  # update() replaces the tensor: this stays the step's scale
        for opt in optimizers:
            _step_on_device(opt, found_inf)
        scaler.update(found_inf)
        return StepInfo(applied=found_inf == 0, loss_scale=loss_scale_now, grad_norm=norm,
                        skipped_steps=scaler.skipped_steps.clone())

    # 3. The one host sync.
    values = [found_inf, scaler.scale_tensor, scaler.skipped_steps, scaler.skipped_in_a_row_tensor]
    if norm is not None:
        values.append(norm.to(found_inf.device))
    if bad_weights is not None:
        values.append(bad_weights)
    read = _read_together(values)
    overflow, loss_scale, skipped_before, in_a_row = read[0] != 0, read[1], int(read[2]), int(read[3]) + 1
    weights_broken = bad_weights is not None and read[-1] != 0
    storm = overflow and limit is not None and in_a_row >= limit
    if weights_broken or storm:  # the run ends here: say why, while the FP32 gradients are still held
        error = NaNStormError("weights" if weights_broken else "storm", in_a_row,
                              skipped_before + 1, loss_scale, _diagnose(optimizers, grads))
        if weights_broken:  # not applied; the scale has nothing to do with it and stays as it is
            for opt in optimizers:
                if isinstance(opt, MasterWeights):
                    opt.release_grads_()
            raise error

    # Provenance of a skipped step (a cold path, as rare as skips): which parameters' gradients overflowed.
    found = _diagnose(optimizers, grads, weights_too=False) if overflow else []

    # 4. Update only with finite gradients.
    for opt in optimizers:
        if not overflow:
            opt.step()
        elif isinstance(opt, MasterWeights):
            opt.release_grads_()  # the step consumed them, applied or not

    # 5. Scale update (tensor ops), then host-side bookkeeping with the values already read.
    scaler.update(found_inf)
    scaler.observe(overflow, loss_scale, in_a_row if overflow else 0)
    if storm:
        raise error
    return StepInfo(
        applied=not overflow,
        loss_scale=loss_scale,
        grad_norm=read[4] if norm is not None else None,
        skipped_steps=skipped_before + int(overflow),
        nonfinite={_label(i, p): kinds for _, i, p, kinds in found} if overflow else None,
        _params=tuple(p for _, _, p, _ in found))
