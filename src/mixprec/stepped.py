"""What `mp.step` steps: the optimizers it was given, the gradients and weights they step, and whether
they can skip an overflowing step on the device by themselves (``mp.step(..., sync=False)``).

A `MasterWeights` steps FP32 masters on FP32 gradients; a plain optimizer steps its parameters on their
own gradients (local shards of FSDP2's DTensors).
"""

from __future__ import annotations

from typing import Any

import torch

from .master import MasterWeights, managed
from .state import is_dtensor

__all__ = ["as_optimizers", "gather_grads", "weights", "local", "check_skips_on_device", "skips_on_device",
           "step_on_device", "publish"]


#: Packages whose optimizer wrappers stand for the optimizer they wrap (``.optimizer``), adding only bookkeeping:
#: Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer. Other wrappers (a Lookahead, say) change
#: the update and are stepped as they are.
_FRAMEWORKS = ("accelerate.", "lightning.", "pytorch_lightning.", "lightning_fabric.")


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer a framework's wrapper stands for (see `_FRAMEWORKS`), else `optimizer` itself."""
    while type(optimizer).__module__.startswith(_FRAMEWORKS) and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def as_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The optimizers `mp.step` was given, framework wrappers seen through (see `_FRAMEWORKS`)."""
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    optimizers = [_unwrapped(o) for o in optimizers]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(f"mp.step takes an optimizer or a list of optimizers (those mp.prepare returned), "
                        f"got {optimizer!r}")
    return optimizers


def gather_grads(optimizers: list[torch.optim.Optimizer], ranks: int) -> tuple[list[torch.Tensor], list[bool]]:
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


def weights(optimizers: list[torch.optim.Optimizer]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(position, model parameter, tensor the optimizer steps: its master or itself) for each parameter."""
    found: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for opt in optimizers:
        stepped = opt.weight_values if isinstance(opt, MasterWeights) else [
            t for group in opt.param_groups for t in group["params"]]
        models = opt.model_params if isinstance(opt, MasterWeights) else stepped
        found += [(len(found) + i, p, t) for i, (p, t) in enumerate(zip(models, stepped, strict=True))]
    return found


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), any other tensor itself."""
    dtensor: Any = t
    return dtensor.to_local() if is_dtensor(t) else t


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return optimizer.optimizer if isinstance(optimizer, MasterWeights) else optimizer


def check_skips_on_device(optimizers: list[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        # torch sets this on optimizers whose step reads `found_inf` (its fused=True Adam, AdamW, SGD, Adagrad).
        if not getattr(_inner(opt), "_step_supports_amp_scaling", False):
            raise ValueError(
                f"mp.step(..., sync=False) needs optimizers that skip an overflowing step on the device, "
                f"got {type(_inner(opt)).__name__} without that: build it with fused=True (torch's Adam, "
                f"AdamW, SGD and Adagrad have it), or leave sync=True (one host read per step)")


def skips_on_device(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether every parameter with a gradient already has its optimizer state: a first step is synced.

    A skipped first step must leave no state behind, and torch's fused SGD, skipping its first step on
    the device, leaves its momentum buffers uninitialised (garbage in every later step).
    """
    unsure = [opt for opt in map(_inner, optimizers)  # every parameter with state: no need to look one by one
              if len(opt.state) < sum(len(group["params"]) for group in opt.param_groups)]
    return all(p.grad is None or p in opt.state for opt in unsure for group in opt.param_groups
               if not (isinstance(opt, torch.optim.SGD) and group["momentum"] == 0)  # SGD without momentum: no state
               for p in group["params"])


def step_on_device(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step `optimizer`, which updates nothing (parameters, state, step counts) where found_inf != 0."""
    inner: Any = _inner(optimizer)  # torch's fused optimizers read these two attributes when set
    inner.found_inf, inner.grad_scale = found_inf, None  # how torch.amp.GradScaler hands them over
    try:
        optimizer.step()
    finally:
        del inner.found_inf, inner.grad_scale


def publish(optimizers: list[torch.optim.Optimizer], settled: bool = True) -> None:
    for opt in optimizers:
        if isinstance(opt, MasterWeights):
            opt.publish_grads_(settled)
