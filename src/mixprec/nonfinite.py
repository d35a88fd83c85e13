"""Finding inf/NaN in gradients: the fused unscale-and-check pass, and per-tensor flags for the cold path.

`unscale_and_check_` is what a loss scaler runs on every step (one pass per device and dtype, torch's
fused kernel where it exists); `find_nonfinite` names the tensors that hold inf/NaN after a skipped step;
`group_by_device_and_dtype` batches tensors for one foreach call each (also used by `mp.step`'s clip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["unscale_and_check_", "find_nonfinite", "group_by_device_and_dtype"]

# torch's fused unscale+check kernel exists for these device types and dtypes (checked on torch 2.4+).
_FUSED_DEVICE_TYPES = {"cpu", "cuda", "xpu"}
_FUSED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _dense_(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor itself; a sparse COO gradient's values (nn.Embedding(sparse=True)'s), which alias it.

    FP16 ones are coalesced first, as torch.amp.GradScaler does: duplicate indices whose scaled values sum
    past 65504 overflow here, not later in the optimizer. In place (``copy_``): ``p.grad`` stays the tensor
    the optimizer reads. (Coalescing syncs on CUDA, as in torch.)
    """
    if t.is_sparse and t.dtype == torch.float16 and not t.is_coalesced():
        t.copy_(t.coalesce())
    return t._values() if t.is_sparse else t


def group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """The non-empty `tensors` (a sparse one: its values) by (device, dtype), for one foreach call each."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in map(_dense_, tensors):
        if t.numel():  # an empty tensor (a rank's empty FSDP shard) holds nothing to check or unscale
            groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def unscale_and_check_(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor,
                       check_unscaled: bool = False) -> torch.Tensor:
    """Multiply every gradient in place by ``inv_scale`` and report whether any was inf/NaN.

    One fused pass per (device, dtype) group: torch's ``_amp_foreach_non_finite_check_and_unscale_``
    where it exists for the device and dtype (it checks the scaled values, before the multiply),
    otherwise a pure-torch foreach fallback (a foreach multiply, then an inf-norm per tensor, which is
    inf/NaN exactly when the tensor holds an inf/NaN).

    With ``inv_scale <= 1`` a finite gradient stays finite when unscaled, so checking before the multiply
    is enough. With ``inv_scale > 1`` (a loss scale below 1) a finite gradient can overflow when unscaled:
    pass ``check_unscaled=True`` to check the unscaled values as well (one more pass).

    Args:
        grads: gradient tensors, on any devices and floating dtypes; a sparse COO one (nn.Embedding(sparse=True))
            has its values unscaled and checked, FP16 ones coalesced first, as torch.amp.GradScaler does.
        inv_scale: 0-dim float32 tensor, ``1 / scale``; the result lives on its device.
        check_unscaled: also check the gradients after the multiply.

    Returns:
        a 0-dim float32 tensor on ``inv_scale``'s device: 1.0 if any gradient had an inf/NaN, else 0.0.

    Syncs: no.

    Example:
        >>> g = [torch.tensor([2.0, 4.0]), torch.tensor([float("inf")])]
        >>> float(unscale_and_check_(g, torch.tensor(0.5))), g[0].tolist()
        (1.0, [1.0, 2.0])
    """
    found_infs: list[torch.Tensor] = []
    for (device, dtype), group in group_by_device_and_dtype(grads).items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        inv = inv_scale.to(device=device, non_blocking=True)
        fused = device.type in _FUSED_DEVICE_TYPES and dtype in _FUSED_DTYPES
        if fused:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        else:
            torch._foreach_mul_(group, inv.to(dtype))
        if check_unscaled or not fused:  # inf * x and NaN * x stay non-finite: this checks both
            norms = torch._foreach_norm(group, ord=math.inf)
            found = torch.maximum(found, torch.logical_not(torch.isfinite(torch.stack(norms)).all()).float())
        found_infs.append(found)
    if not found_infs:
        return torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    if len(found_infs) == 1 and found_infs[0].device == inv_scale.device:
        return found_infs[0]
    total = torch.stack([f.to(inv_scale.device, non_blocking=True) for f in found_infs]).sum()
    return torch.clamp(total, max=1.0)


def find_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor inf/NaN flags: a bool tensor with one entry per gradient (on the first one's device).

    Meant for the cold path of a skipped step (e.g. naming the parameters whose gradients overflowed):
    the gradients keep their inf/NaN after unscaling, so this can run after `mp.step`.

    Syncs: no (reading the result does).

    Example:
        >>> find_nonfinite([torch.ones(2), torch.tensor([1.0, float("nan")])]).tolist()
        [False, True]
    """
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    device = grads[0].device
    flags = torch.zeros(len(grads), dtype=torch.bool, device=device)
    grads = [_dense_(g) for g in grads]
    index = {id(g): i for i, g in enumerate(grads)}
    for group in group_by_device_and_dtype(grads).values():
        norms = torch.stack(torch._foreach_norm(group, ord=math.inf)).to(device)
        where = torch.tensor([index[id(g)] for g in group], device=device)
        flags[where] = torch.logical_not(torch.isfinite(norms))
    return flags
