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
   in ONE transfer: the step's only host sync (later, the cross-rank agreement on found-inf goes
   right before it);
5. step the optimizer if the gradients were finite; otherwise leave every parameter, master and
   optimizer state tensor untouched;
6. update the loss scale (tensor ops) and let the scaler warn or raise at its floor.

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .distributed import is_dtensor
from .master import MasterWeights
from .scaling import LossScaler

__all__ = ["StepInfo", "step"]


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
    """

    applied: bool
    loss_scale: float
    grad_norm: float | None
    skipped_steps: int = 0


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
    grads: list[torch.Tensor] = []
    for optimizer in optimizers:
        if isinstance(optimizer, MasterWeights):
            # Across ranks, an FP32 gradient is used only where mixprec's DDP hook reduced it (equal on
            # every rank); anything else (a reduction mixprec did not see) is read from param.grad.
            grads += optimizer.collect_grads_(trust_fp32=ranks == 1)
        else:
            grads += [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    local, sharded = [], []
    for g in grads:
        shard = is_dtensor(g)
        local.append(g.to_local() if shard else g)
        sharded.append(shard and any(p.is_shard() for p in g.placements))
    return local, sharded


def _read_together(values: list[torch.Tensor]) -> list[float]:
    """One device->host transfer for several 0-dim tensors. float64 keeps integer counts exact."""
    device = values[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.stack([v.to(device=device, dtype=dtype) for v in values]).tolist()


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of several tensors, as torch.nn.utils.get_total_norm computes it (0 for none)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).to(device)


def _agree(found_inf: torch.Tensor, shard_sq: torch.Tensor | None, group: Any) -> tuple[torch.Tensor, Any]:
    """Sum the found-inf flags (any rank's overflow skips every rank) and the sharded squared norms
    over `group`, in one collective."""
    packed = torch.stack([found_inf.float(), torch.zeros_like(found_inf.float()) if shard_sq is None
                          else shard_sq.to(found_inf.device, torch.float32)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return torch.clamp(packed[0], max=1.0), packed[1]


def _clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float, found_inf: torch.Tensor) -> None:
    """Clip ``grads`` in place by ``max_norm / (norm + 1e-6)`` (clamped to 1) unless ``found_inf``.

    The same arithmetic as torch.nn.utils.clip_grad_norm_, on gradient tensors rather than parameters.
    With an overflow the norm is inf/NaN; replacing it by 0 makes the coefficient exactly 1, so the
    gradients are left as they are, no sync.
    """
    masked = torch.where(found_inf.to(norm.device) != 0, torch.zeros_like(norm), norm)
    coef = torch.clamp(max_norm / (masked + 1e-6), max=1.0)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        torch._foreach_mul_(group, coef.to(device))


def step(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scaler: LossScaler,
    max_grad_norm: float | None = None,
    group: Any = None,
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

    Returns:
        `StepInfo`: whether the update was applied, the loss scale used, the gradient norm.

    Raises:
        RuntimeError: no parameter has a gradient (backward was not called since ``zero_grad``); or
            step was already called since the last ``scaler.scale(loss)`` (a second update from the
            same gradients, or one optimizer stepped after the scale changed: pass them all at once).

    Syncs: yes, exactly once: found-inf, gradient norm, loss scale and skipped-step count are read
    together in one transfer. (The optimizer's own step may add syncs of its own, as without mixprec.)
    With several ranks, one all-reduce of two numbers comes right before that read.

    Example:
        >>> import torch, mixprec as mp
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt, scaler = torch.optim.SGD([p], lr=1.0), mp.DynamicScaler(init_scale=4.0, hysteresis=1)
        >>> p.grad = torch.tensor([float("inf"), 4.0])
        >>> info = mp.step(opt, scaler)
        >>> info.applied, info.loss_scale, scaler.loss_scale, p.tolist()
        (False, 4.0, 2.0, [1.0, 1.0])
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    optimizers = _optimizers(optimizer)
    scaler.check_not_stepped()
    ranks = _group_size(group)
    grads, sharded = _gather_grads(optimizers, ranks)
    if not grads:
        raise RuntimeError(
            "mp.step found no gradients: call scaler.scale(loss).backward() before mp.step "
            "(and optimizer.zero_grad() after it, not before)"
        )

    # 1. Unscale + check, fused; grads are FP32 masters' grads when MasterWeights is used.
    found_inf = scaler.unscale_and_check_(grads)

    # 2. Agree across ranks (one collective), then clip the unscaled gradients if they are finite.
    device = found_inf.device
    norm = None
    if max_grad_norm is not None:
        # In FP32: a 16-bit norm overflows long before the gradients do (a plain optimizer over
        # 16-bit parameters steps 16-bit grads).
        shards = [g.float() for g, s in zip(grads, sharded, strict=True) if s]
        replicas = [g.float() for g, s in zip(grads, sharded, strict=True) if not s]
        shard_sq = _norm(shards, device) ** 2 if shards else None
        replica_norm = _norm(replicas, device)
    if ranks > 1:
        found_inf, shard_sq_total = _agree(found_inf, shard_sq if max_grad_norm is not None else None, group)
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

    # 3. The one host sync.
    values = [found_inf, scaler.scale_tensor, scaler.skipped_steps]
    if norm is not None:
        values.append(norm.to(found_inf.device))
    read = _read_together(values)
    overflow, loss_scale, skipped_before = read[0] != 0, read[1], int(read[2])

    # 4. Update only with finite gradients.
    for opt in optimizers:
        if not overflow:
            opt.step()
        elif isinstance(opt, MasterWeights):
            opt.release_grads_()  # the step consumed them, applied or not

    # 5. Scale update (tensor ops), then host-side bookkeeping with the values already read.
    scaler.update(found_inf)
    scaler.observe(overflow, loss_scale)
    scaler.mark_stepped()
    return StepInfo(
        applied=not overflow,
        loss_scale=loss_scale,
        grad_norm=read[3] if norm is not None else None,
        skipped_steps=skipped_before + int(overflow),
    )
