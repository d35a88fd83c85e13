"""Several ranks: DDP's gradient reduction through a communication hook, FSDP2's mixed precision.

DDP. Wrap the prepared model, as without mixprec::

    model, optimizer, scaler = mp.prepare(model, optimizer, "f16-master")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with mp.autocast(ddp):                 # registers mixprec's communication hook on first use
        loss = loss_fn(ddp(x), y)
    scaler.scale(loss).backward()          # DDP reduces each bucket through the hook, overlapped
    info = mp.step(optimizer, scaler)      # every rank takes the same skip decision

The hook (`register_comm_hook`) sums each bucket of gradients in the policy's ``reduce`` format:
in FP32 by default for master-weight policies, from each rank's FP32 gradient (micro-batches
accumulated in FP32, ``no_sync`` included); the averaged FP32 sum becomes the masters' gradient,
equal on every rank, and its rounding the model's 16-bit ``.grad``. With ``reduce=fp16``/``bf16`` the
sum runs in 16 bits (half the bytes on the wire); emulated parameters get sums rounded onto their
grid. Plain DDP's own reduction is used where it already does what the policy says (FP32 or native
16-bit parameters reduced in their own format).

FSDP2. ``fully_shard(module, mp_policy=mp.distributed.fsdp_mixed_precision(policy))``: FSDP's sharded
FP32 parameters are the master weights, it casts them to the policy's parameter format for forward
and backward and reduce-scatters gradients in the ``reduce`` format; `mp.prepare` then leaves the
parameters alone (no `MasterWeights`), and `mp.step` unscales, checks and clips the sharded
gradients, summing their norm over the ranks.

See docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .formats import F32, Format
from .gradients import GradSlot
from .policy import Policy
from .quantize import quantize
from .state import is_dtensor, is_sharded, prepared_state, unwrap

__all__ = ["register_comm_hook", "fsdp_mixed_precision", "fully_shard", "is_dtensor", "is_sharded", "unwrap"]

_HOOK_ATTR = "_mixprec_comm_hook"


class _Reduction:
    """What the communication hook needs: the group, the formats, and the FP32 gradients' slots."""

    def __init__(self, group: Any, reduce: Format | None, execution: str, storage: dict[int, Format],
                 slots: dict[int, GradSlot]) -> None:
        self.group, self.reduce, self.execution = group, reduce, execution
        self.storage, self.slots = storage, slots
        self.ranks = dist.get_world_size(group)


def register_comm_hook(ddp: torch.nn.parallel.DistributedDataParallel) -> bool:
    """Make `ddp` reduce gradients as the prepared model's policy says (its ``reduce`` key).

    `mp.autocast(ddp)` calls this on first use; call it yourself if you run the forward under
    ``mp.autocast(ddp.module)``. It also gives every rank rank 0's FP32 masters (DDP gives them rank
    0's parameters at construction). Returns False, registering nothing, where DDP's own reduction
    already does what the policy asks, or when it was registered before.

    Raises:
        TypeError: `ddp` is not a DistributedDataParallel around a model prepared with mp.prepare.
        RuntimeError: DDP already has another communication hook (DDP takes one).

    Example (each rank)::

        model, opt, scaler = mp.prepare(model, opt, "f16-master")
        ddp = DistributedDataParallel(model)
        mp.distributed.register_comm_hook(ddp)
    """
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_comm_hook takes a DistributedDataParallel, got {type(ddp).__name__}")
    state = prepared_state(ddp.module)
    if state is None:
        raise TypeError("the model inside this DistributedDataParallel is not prepared: call mp.prepare "
                        "on the model first, then wrap it in DistributedDataParallel")
    if getattr(ddp, _HOOK_ATTR, False):
        return False
    if state.originals is not None:  # the masters are yet to come: the hook would not know them
        raise RuntimeError("the model inside this DistributedDataParallel was prepared without an optimizer: call "
                           "optimizer = mp.prepare_optimizer(model, optimizer, scaler) before the first "
                           "mp.autocast(ddp) (which registers mixprec's gradient reduction)")
    slots = {id(slot.param): slot for slot in state.grad_slots}
    storage = {id(p): state.param_formats[name] for name, p in ddp.module.named_parameters()}
    reduce = state.policy.reduce if isinstance(state.policy.reduce, Format) else None  # normalized by Policy
    plain = not slots and (state.execution == "native" or all(f == F32 for f in storage.values()))
    if plain and (reduce is None or all(f == reduce for f in storage.values())):
        setattr(ddp, _HOOK_ATTR, True)
        return False  # DDP's built-in all-reduce already sums each gradient in the asked format
    group = ddp.process_group
    with torch.no_grad():  # rank 0's masters, as DDP gave every rank rank 0's parameters
        source = dist.get_global_rank(group, 0)
        for weights in state.all_master_weights:
            for t in weights.held_tensors():  # FP32 masters, remainders, compensations
                dist.broadcast(t, src=source, group=group)
            weights.restamp_()
    try:
        ddp.register_comm_hook(_Reduction(group, reduce, state.execution, storage, slots), _reduce_bucket)
    except RuntimeError as error:
        raise RuntimeError(
            f"could not register mixprec's communication hook ({error}); DDP takes one hook: remove "
            f"yours, or use reduce=storage in the policy and mp.autocast(ddp.module)") from error
    setattr(ddp, _HOOK_ATTR, True)
    return True


def _spans(params: list[torch.Tensor]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for p in params:
        spans.append((start, start + p.numel()))
        start += p.numel()
    return spans


_WIRE_16 = (torch.float16, torch.bfloat16)


def _round(x: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    return x if fmt is None or fmt == F32 else quantize(x, fmt)


def _reduce_bucket(state: _Reduction, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one bucket over the ranks in the policy's reduce format; see the module docstring."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    spans = _spans(params)
    # Each gradient's best FP32 value: a master's FP32 gradient, settled against param.grad by value (the
    # bucket holds a copy of param.grad), else the 16-bit one.
    work = buffer.to(torch.float32, copy=True)
    for p, (a, b) in zip(params, spans, strict=True):
        slot = state.slots.get(id(p))
        if slot is not None:
            slot.settle_()
            if slot.master.grad is not None:
                work[a:b] = slot.master.grad.flatten()
    formats = [state.reduce if state.reduce is not None else state.storage.get(id(p), F32) for p in params]
    sum_in_fp32 = all(f == F32 for f in formats)
    wire = work
    if not sum_in_fp32:  # a 16-bit sum: divide first (to stay in range) and round each addend, as DDP does
        work.div_(state.ranks)
        for fmt, (a, b) in zip(formats, spans, strict=True):
            work[a:b] = _round(work[a:b], fmt)
        if state.execution == "native" and len(set(formats)) == 1 and formats[0].torch_dtype in _WIRE_16:
            wire = work.to(formats[0].torch_dtype)  # natively the bytes on the wire are 16-bit too
    fut = dist.all_reduce(wire, group=state.group, async_op=True).get_future()

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        total = fut.value()[0].float()
        if sum_in_fp32:
            total.div_(state.ranks)
        for p, fmt, (a, b) in zip(params, formats, spans, strict=True):
            part = _round(total[a:b], fmt)
            slot = state.slots.get(id(p))
            if slot is not None:
                # The averaged FP32 sum is the master's gradient (equal on every rank); a 16-bit sum
                # has nothing to add to param.grad, which the reducer fills with it.
                slot.master.grad = part.view_as(slot.master) if fmt == F32 else None
                slot.reduced, slot.settled = True, False
            storage = state.storage.get(id(p), F32)
            buffer[a:b] = part if state.execution == "native" else _round(part, storage)
        return buffer

    reduced: torch.futures.Future[torch.Tensor] = fut.then(finish)
    return reduced


# DDP checks the hook's annotations as objects; this module's are strings (postponed evaluation).
_reduce_bucket.__annotations__ = {"state": _Reduction, "bucket": dist.GradBucket,
                                  "return": torch.futures.Future[torch.Tensor]}


def fsdp_mixed_precision(policy: Any) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a mixprec policy: parameters all-gathered in the policy's
    parameter format, gradients reduce-scattered in its ``reduce`` format (FP32 by default with masters).

    Example:
        >>> import mixprec as mp
        >>> mpp = mp.distributed.fsdp_mixed_precision("bf16-master")
        >>> mpp.param_dtype, mpp.reduce_dtype
        (torch.bfloat16, torch.float32)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = Policy.parse(policy)
    for fmt in (policy.params, policy.reduce or policy.params):
        if fmt.torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"FSDP2 casts parameters and reduces gradients in fp32, fp16 or bf16; {policy} "
                             f"asks for {fmt.name}, which mixprec can only emulate (use DDP for that)")
    param_dtype = None if policy.params == F32 else policy.params.torch_dtype
    reduce_dtype = (policy.reduce or policy.params).torch_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def fully_shard(model: torch.nn.Module, policy: Any, modules: Any = (), **kwargs: Any) -> torch.nn.Module:
    """Shard `model` with FSDP2 under `policy`: FP32 islands, then each of `modules` (e.g. the
    transformer blocks), then the root, each with the policy's ``MixedPrecisionPolicy``.

    FP32 islands (norms, and modules a rule keeps in FP32) are their own FSDP units that stay in FP32,
    as their parameters do without FSDP. Then call `mp.prepare` on the sharded model. Extra keyword
    arguments (``mesh``, ``reshard_after_forward``, ...) go to ``torch.distributed.fsdp.fully_shard``.

    Example (each rank)::

        model = mp.distributed.fully_shard(model, "bf16-master", modules=model.blocks)
        optimizer = torch.optim.AdamW(model.parameters())
        model, optimizer, scaler = mp.prepare(model, optimizer, "bf16-master")
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as shard

    policy = Policy.parse(policy)
    mixed = fsdp_mixed_precision(policy)
    by_name = dict(model.named_modules())
    islands = [by_name[mp.name] for mp in policy.module_precisions(model, warn=True)
               if mp.name and mp.has_params and mp.params == F32 and policy.params != F32]
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for module in islands:
        shard(module, mp_policy=fp32, **kwargs)
    for module in modules:
        shard(module, mp_policy=mixed, **kwargs)
    shard(model, mp_policy=mixed, **kwargs)
    return model
