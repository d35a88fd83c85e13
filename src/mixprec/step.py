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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import stepped
from .master import MasterWeights
from .nonfinite import find_nonfinite, group_by_device_and_dtype
from .outcome import NaNStormError, StepInfo, label
from .scaling import LossScaler, NoScaler

__all__ = ["StepInfo", "step", "unscale_", "NaNStormError", "refuse_unscaled_step"]


def _group_size(group: Any) -> int:
    """Ranks in `group` (the world by default); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


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


def _diagnose(optimizers: list[torch.optim.Optimizer], grads: list[torch.Tensor],
              weights_too: bool = True) -> list[tuple[str, int, Any, str]]:
    """Which gradients (and weights) hold inf/NaN, by parameter (cold path: it reads values to the host).
    Run before the step releases the FP32 gradients: `grads` line up with the stepped tensors that have one."""
    weights = stepped.weights(optimizers)
    checks = [("gradients", [(i, p) for i, p, t in weights if t.grad is not None], grads)]
    if weights_too:
        checks.append(("weights", [(i, p) for i, p, _ in weights], [stepped.local(t) for _, _, t in weights]))
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


def _grads_to_step(optimizers: list[torch.optim.Optimizer], scaler: LossScaler,
                   ranks: int) -> tuple[list[torch.Tensor], list[bool]]:
    """The gradients `_gather_grads` finds, refusing a step with none (and a second step on the same ones)."""
    scaler.skips.check_not_stepped(scaler.scales_loss)
    found = stepped.gather_grads(optimizers, ranks)
    if not found[0]:
        raise RuntimeError(
            "mp.step found no gradients: call scaler.scale(loss).backward() before mp.step "
            "(and optimizer.zero_grad() after it, not before)")
    return found


def refuse_unscaled_step(scaler: LossScaler) -> Callable[..., None]:
    """An optimizer step pre-hook (`mp.prepare` registers it) refusing ``optimizer.step()`` on gradients
    `scaler` scaled that no `mp.step` has unscaled and checked (a NoScaler's are as they were)."""
    def refuse(optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
        if scaler.skips.unstepped and not isinstance(scaler, NoScaler):
            raise RuntimeError(
                f"optimizer.step() after scaler.scale(loss).backward(): the gradients are still multiplied by "
                f"the loss scale ({scaler.loss_scale:g}) and unchecked for inf/NaN. Step with "
                f"mp.step(optimizer, scaler), which unscales, checks, clips and skips overflowing steps")
    return refuse


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
    optimizers = stepped.as_optimizers(optimizer)
    if scaler.skips.take_unscaled(optimizers, peek=True) is not None:
        raise RuntimeError("mp.unscale_ was already called for this backward: call mp.step next")
    grads, _ = _grads_to_step(optimizers, scaler, _group_size(None))
    scaler.skips.keep_unscaled(optimizers, scaler.unscale_and_check_(grads))
    stepped.publish(optimizers, settled=False)  # the step settles them again: they may be edited in between


@dataclass
class _Checked:
    """What the first phases found: the gradients to step on, and the flags the apply phases read."""

    grads: list[torch.Tensor]
    found_inf: torch.Tensor  # 0-dim float32, agreed across ranks: nonzero skips the step
    norm: torch.Tensor | None  # the total L2 norm of the unscaled gradients, when clipping was asked for
    bad_weights: torch.Tensor | None  # the weights hold inf/NaN (checked on the step after a skipped one)


def _check_arguments(optimizer: Any, scaler: Any, max_grad_norm: Any, sync: Any) -> list[torch.optim.Optimizer]:
    """The optimizers to step, or a TypeError/ValueError saying which argument is wrong and how."""
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
    optimizers = stepped.as_optimizers(optimizer)
    if not sync:
        stepped.check_skips_on_device(optimizers)
    return optimizers


def _unscale_check_agree(optimizers: list[torch.optim.Optimizer], scaler: LossScaler, clip: bool, sync: bool,
                         ranks: int, group: Any) -> _Checked:
    """Phase 1: unscale and check the gradients (one fused pass), measure their norm, agree across ranks.

    The gradients are the FP32 masters' where `MasterWeights` is used. After `mp.unscale_` they are
    unscaled already (and maybe clipped by hand): gathered again, not unscaled twice. After a skipped
    step the weights are checked too (a NaN weight makes every later step skip), read with the step's
    one sync, so clean steps pay nothing. One collective agrees on all three across ranks.
    """
    unscaled = scaler.skips.take_unscaled(optimizers)  # found-inf of an mp.unscale_ for this backward, or None
    grads, sharded = _grads_to_step(optimizers, scaler, ranks)
    found_inf = scaler.unscale_and_check_(grads) if unscaled is None else unscaled
    scaler.skips.mark_stepped()  # unscaled in place: this step has consumed them (optimizer.step() may now run)
    device = found_inf.device
    bad_weights = None
    if scaler.known_skipped_in_a_row != 0 and sync:  # None: steps with sync=False ran since the last read
        local = [stepped.local(t) for _, _, t in stepped.weights(optimizers)]
        bad_weights = find_nonfinite(local).any().float().to(device) if local else None
    shard_sq = replica_norm = None
    if clip:
        # In FP32: a 16-bit norm overflows long before the gradients do (a plain optimizer over
        # 16-bit parameters steps 16-bit grads). Shards' squared norms are summed over the ranks.
        shards = [_summed(g).float() for g, s in zip(grads, sharded, strict=True) if s]
        replicas = [_summed(g).float() for g, s in zip(grads, sharded, strict=True) if not s]
        shard_sq = _norm(shards, device) ** 2 if shards else None
        replica_norm = _norm(replicas, device)
    if ranks > 1:
        found_inf, shard_sq_total, bad_total = _agree(found_inf, shard_sq, bad_weights, group)
        bad_weights = None if bad_weights is None else bad_total
        shard_sq = None if shard_sq is None else shard_sq_total
    norm = replica_norm
    if replica_norm is not None and shard_sq is not None:
        norm = torch.sqrt(shard_sq + replica_norm**2)
    return _Checked(grads, found_inf, norm, bad_weights)


def _clip_phase(checked: _Checked, max_grad_norm: float) -> None:
    """Phase 2: clip the unscaled gradients to ``max_grad_norm`` if they are finite (no sync).

    A norm that overflows FP32 while every gradient is finite cannot clip (its coefficient is 0): the
    step is skipped as for an overflow instead of zeroing the gradients and stepping on.
    """
    assert checked.norm is not None
    found_inf = checked.found_inf
    checked.found_inf = torch.maximum(found_inf, (~torch.isfinite(checked.norm)).to(found_inf.device, found_inf.dtype))
    _clip_(checked.grads, checked.norm, max_grad_norm, checked.found_inf)


def _apply_on_device(optimizers: list[torch.optim.Optimizer], scaler: LossScaler, checked: _Checked) -> StepInfo:
    """Phase 3 with ``sync=False``: no host read; the optimizers skip an overflowing step themselves."""
    loss_scale_now = scaler.scale_tensor  # update() replaces the tensor: this stays the step's scale
    for opt in optimizers:
        stepped.step_on_device(opt, checked.found_inf)
    scaler.update(checked.found_inf)
    return StepInfo(applied=checked.found_inf == 0, loss_scale=loss_scale_now, grad_norm=checked.norm,
                    skipped_steps=scaler.skipped_steps.clone())


def _apply_synced(optimizers: list[torch.optim.Optimizer], scaler: LossScaler, checked: _Checked,
                  limit: int | None) -> StepInfo:
    """Phase 3: the one host sync, the guards, the update if the gradients were finite, the scale's update."""
    found_inf, norm, bad_weights = checked.found_inf, checked.norm, checked.bad_weights
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
                              skipped_before + 1, loss_scale, _diagnose(optimizers, checked.grads))
        if weights_broken:  # not applied; the scale has nothing to do with it and stays as it is
            for opt in optimizers:
                if isinstance(opt, MasterWeights):
                    opt.release_grads_()
            raise error

    # Provenance of a skipped step (a cold path, as rare as skips): which parameters' gradients overflowed.
    found = _diagnose(optimizers, checked.grads, weights_too=False) if overflow else []
    for opt in optimizers:  # update only with finite gradients
        if not overflow:
            opt.step()
        elif isinstance(opt, MasterWeights):
            opt.release_grads_()  # the step consumed them, applied or not

    # The scale's update (tensor ops), then host-side bookkeeping with the values already read.
    scaler.update(found_inf)
    scaler.observe(overflow, loss_scale, in_a_row if overflow else 0)
    if storm:
        raise error
    return StepInfo(
        applied=not overflow,
        loss_scale=loss_scale,
        grad_norm=read[4] if norm is not None else None,
        skipped_steps=skipped_before + int(overflow),
        nonfinite={label(i, p): kinds for _, i, p, kinds in found} if overflow else None,
        _params=tuple(p for _, _, p, _ in found))


def step(
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
    optimizers = _check_arguments(optimizer, scaler, max_grad_norm, sync)
    limit = _skip_limit(max_skips_in_a_row, scaler)
    checked = _unscale_check_agree(optimizers, scaler, max_grad_norm is not None, sync, _group_size(group), group)
    for state in scaler.attached.values():  # more scaling state moving once a step: FP8 amax histories
        if hasattr(state, "step_"):
            state.step_(group)
    if max_grad_norm is not None:
        _clip_phase(checked, max_grad_norm)
    stepped.publish(optimizers)  # param.grad unscaled (and clipped) too, as torch.amp leaves it
    if not sync and stepped.skips_on_device(optimizers):
        return _apply_on_device(optimizers, scaler, checked)
    return _apply_synced(optimizers, scaler, checked, limit)
