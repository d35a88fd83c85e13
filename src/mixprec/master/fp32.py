"""Mode ``"fp32"``: an FP32 master copy beside every 16-bit (or emulated) parameter (the paper's recipe).

The optimizer steps the masters; the gradients reach them through `mixprec.gradients.GradSlot` (one per
parameter); after each update the masters are rounded back into the model, one ``torch._foreach_copy_``
per (device, dtype) group for real 16-bit parameters, `mixprec.quantize` per tensor for emulated ones.
"""

from __future__ import annotations

from typing import Any

import torch

from ..gradients import GradSlot, put_first
from ..quantize import quantize

__all__ = ["FP32Masters"]


class FP32Masters:
    """The parameters of a `MasterWeights` that have an FP32 master, and what is done to them per step.

    Args:
        slots: one `GradSlot` per parameter with a master.
    """

    def __init__(self, slots: list[GradSlot]) -> None:
        self.slots: list[GradSlot] = []
        # Real 16-bit parameters, grouped for one foreach copy each: (device, dtype) -> (params, masters).
        self._native: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.add(slots)

    def add(self, slots: list[GradSlot], modes: list[str] | None = None, indices: list[int] | None = None) -> None:
        """Take more parameters with masters (a param group added to the optimizer); `modes` and `indices`
        are for `TransientMasters`."""
        self.slots += slots
        for slot in slots:
            if not slot.emulated:
                models, masters = self._native.setdefault((slot.param.device, slot.param.dtype), ([], []))
                models.append(slot.param)
                masters.append(slot.master)

    def value(self, slot: GradSlot) -> torch.Tensor:
        """The FP32 master of `slot` where it still rounds to its parameter, else the parameter's value."""
        return slot.refine(slot.master.detach(), slot.param.detach())

    @torch.no_grad()
    def put_(self, slot: GradSlot, value: torch.Tensor) -> None:
        """Make FP32 `value` the master of `slot`, and round it into the parameter."""
        slot.master.copy_(value)
        slot.param.copy_(slot.round(value))

    def held_tensors(self) -> list[torch.Tensor]:
        """The FP32 masters (for memory counts and DDP's broadcast)."""
        return [slot.master for slot in self.slots]

    def restamp_(self) -> None:
        """Nothing to do: an FP32 master is checked against its parameter by value."""

    def register_hooks(self, slots: list[GradSlot]) -> list[Any]:
        """The gradient hooks on every parameter of `slots` that trains, first in PyTorch's order (before
        hooks users registered earlier); returns their handles."""
        handles: list[Any] = []
        for slot in slots:
            if slot.param.requires_grad:
                p = slot.param
                handles += [p.register_hook(slot.accumulate_hook),
                            p.register_post_accumulate_grad_hook(slot.write_back_hook)]
                put_first(p._backward_hooks, handles[-2])
                put_first(p._post_accumulate_grad_hooks, handles[-1])
        return handles

    def settle_(self, trust_fp32: bool, trust_masters: bool = True) -> None:
        """Once per step: take each FP32 gradient where it still rounds to ``param.grad`` (all of it from
        ``param.grad`` unless `trust_fp32` or mixprec's DDP hook reduced it), and sync the masters (each
        from its parameter unless `trust_masters`)."""
        for slot in self.slots:
            if not slot.settled:  # after this, mp.step unscales master.grad in place
                slot.settle_(trust_fp32 or slot.reduced)
                slot.sync_master_(trust_masters or slot.reduced)  # in the same pass: where the update starts
                slot.settled = True

    def sync_(self, trust_fp32: bool) -> None:
        """Keep each master only where it still rounds to its parameter."""
        for slot in self.slots:
            slot.sync_master_(trust_fp32 or slot.reduced)

    def publish_(self, settled: bool) -> None:
        """Round the FP32 gradients into the parameters' ``.grad``; `settled=False`: settle again next step."""
        for models, masters in self._native.values():
            pairs = [(p.grad, m.grad) for p, m in zip(models, masters, strict=True)
                     if p.grad is not None and m.grad is not None]
            if pairs:
                torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        for slot in self.slots:
            if slot.emulated:
                slot.publish_()
            slot.settled = settled and slot.settled

    def copy_to_model_(self, release_grads: bool) -> None:
        """Round the masters into the model's parameters (and drop the FP32 gradients, if asked)."""
        for models, masters in self._native.values():
            torch._foreach_copy_(models, masters)
        for slot in self.slots:
            if slot.emulated:
                slot.param.copy_(quantize(slot.master, slot.fmt))
            if release_grads:
                slot.release_()

    def release_grads_(self) -> None:
        """Drop this step's FP32 gradients."""
        for slot in self.slots:
            slot.release_()

    def forget_step(self) -> None:
        """After ``zero_grad``: no gradient is reduced or settled any more."""
        for slot in self.slots:
            slot.reduced = slot.settled = False
