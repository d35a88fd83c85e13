"""Masters that cost less than an FP32 copy: modes ``"compact"``, ``"kahan"`` and ``"stochastic"``.

Between steps each parameter holds its master in fewer bytes (`compact`: an int16 remainder, `kahan`: a
16-bit compensation, `stochastic`: nothing); for the update the FP32 value is rebuilt, the optimizer
steps it, and it is stored again. The optimizer keeps stepping one FP32 tensor per parameter (its state
is keyed by it, as for ``"fp32"``), whose storage exists only during the step: a one-element stand-in
between steps, so that ``master.grad`` (the FP32 gradient, `mixprec.gradients`) works as for FP32 masters.

Transient memory: torch's per-parameter optimizers (`SEPARABLE`) are stepped a chunk of parameters at a
time, each chunk at most as large as the largest parameter, so the FP32 values alive during the step
never exceed the largest parameter's FP32 size (plus the optimizer's own temporaries). Any other
optimizer (LBFGS, a custom one that may couple parameters), or a step with a closure, is stepped once on
every FP32 value together.

The master follows the model as an FP32 master does: a parameter written from outside (its version
counter moved: ``load_state_dict``, DDP's broadcast, an EMA swap) starts again from its new value, and
after a reduction mixprec did not see (``trust_fp32=False``) every master starts from its parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..gradients import GradSlot
from . import compact, kahan, stochastic
from .fp32 import FP32Masters

__all__ = ["TransientMasters", "SEPARABLE", "stand_in"]

#: torch optimizers whose update of a parameter reads only that parameter's gradient and state.
SEPARABLE: tuple[type, ...] = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad", "Adadelta", "ASGD",
    "Adafactor") if hasattr(torch.optim, name))


def stand_in(param: torch.Tensor) -> torch.Tensor:
    """The FP32 tensor a parameter's transient master is between steps: one element, the parameter's shape."""
    return torch.zeros((), dtype=torch.float32, device=param.device).expand(param.shape)  # zero: never garbage


class _Held:
    """What one parameter keeps of its master between steps."""

    __slots__ = ("mode", "buffer", "index", "version")

    def __init__(self, mode: str, buffer: torch.Tensor | None, index: int, version: int) -> None:
        self.mode, self.buffer, self.index, self.version = mode, buffer, index, version


class TransientMasters(FP32Masters):
    """The parameters of a `MasterWeights` whose master is rebuilt for each step, and how.

    Args:
        seed: the seed of mode "stochastic"'s rounding (with the step and the parameter's index).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__([])
        self.seed = seed
        self.held: dict[int, _Held] = {}  # id(slot) -> its buffer, mode, index and the param version we wrote
        self.steps: dict[torch.device, torch.Tensor] = {}  # mode "stochastic": applied steps, per device
        self.rebuilt: set[int] = set()  # id(slot) of those whose FP32 value exists now (during a step)

    def add(self, slots: list[GradSlot], modes: list[str] | None = None, indices: list[int] | None = None) -> None:
        """Take more parameters (`modes`: each one's mode; `indices`: its position among the model's), their
        masters starting from their values."""
        super().add(slots)  # the gradients: as FP32 masters' (one foreach copy per dtype group to publish)
        for slot, mode, index in zip(slots, modes or [], indices or [], strict=True):
            p = slot.param
            buffer = compact.remainder_for(p) if mode == "compact" else kahan.compensation_for(p) \
                if mode == "kahan" else None
            self.held[id(slot)] = _Held(mode, buffer, index, p._version)
            if mode == "stochastic" and p.device not in self.steps:
                self.steps[p.device] = torch.zeros((), dtype=torch.int64, device=p.device)
            self.put_(slot, p.detach().float())  # the master starts from the parameter's value

    # ----- the FP32 value -----------------------------------------------------------------------------
    def value(self, slot: GradSlot) -> torch.Tensor:
        """The FP32 master of `slot`, rebuilt (a new tensor). Syncs: no."""
        held = self.held[id(slot)]
        if held.mode == "compact":
            assert held.buffer is not None
            return compact.join(slot.param.detach(), held.buffer)
        if held.mode == "kahan":
            assert held.buffer is not None
            return kahan.join(slot.param.detach(), held.buffer)
        return stochastic.join(slot.param.detach())

    @torch.no_grad()
    def put_(self, slot: GradSlot, value: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store FP32 `value` as `slot`'s parameter and buffer (`keep`: where true, leave both). Syncs: no."""
        held, p = self.held[id(slot)], slot.param
        fmt = slot.fmt if slot.emulated else None
        if held.mode == "compact":
            assert held.buffer is not None
            compact.split_(value, p, held.buffer)  # exact both ways: a skipped step stores what it read
        elif held.mode == "kahan":
            assert held.buffer is not None
            kahan.split_(value, p, held.buffer, fmt, keep)
        else:
            step = self.steps[p.device]
            stochastic.split_(value, p, slot.fmt, stochastic.noise(p.shape, self.seed, held.index, step))
        held.version = p._version

    # ----- per step -------------------------------------------------------------------------------------
    def settle_(self, trust_fp32: bool, trust_masters: bool = True) -> None:
        for slot in self.slots:
            if not slot.settled:
                slot.settle_(trust_fp32 or slot.reduced)
                slot.settled = True
        self.sync_(trust_masters)

    @torch.no_grad()
    def sync_(self, trust_fp32: bool) -> None:
        """A parameter written from outside since we stored it (or every one whose gradient came from a
        reduction mixprec did not see: not `trust_fp32` and not ``slot.reduced``, as for FP32 masters) starts
        again from its value: its buffer is cleared."""
        for slot in self.slots:
            held = self.held[id(slot)]
            trusted = trust_fp32 or slot.reduced  # mixprec's DDP hook reduced it: equal on every rank
            if (not trusted or held.version != slot.param._version) and held.buffer is not None:
                held.buffer.zero_()
            held.version = slot.param._version

    def copy_to_model_(self, release_grads: bool) -> None:
        """Store the masters rebuilt for a step still running (an LBFGS closure) into the model."""
        for slot in self.slots:
            if id(slot) in self.rebuilt:
                self.put_(slot, slot.master)
            if release_grads:
                slot.release_()

    def step_(self, optimizer: torch.optim.Optimizer, run: Callable[[], Any], whole: bool) -> Any:
        """Run `run` (the inner optimizer's step) with the FP32 masters rebuilt, a chunk at a time unless
        `whole`, and store each chunk after its update; returns what the (last) run returned.

        A step the optimizer skipped on the device (``found_inf`` set on it, `mp.step(..., sync=False)`)
        leaves every parameter, buffer and stochastic counter as it was. Syncs: no.
        """
        due = self.slots if whole else [s for s in self.slots if s.master.grad is not None]
        if not due:
            return run()
        found_inf = getattr(optimizer, "found_inf", None)
        keep = None if found_inf is None else found_inf > 0
        groups = optimizer.param_groups
        given = [group["params"] for group in groups]
        ours = {id(s.master) for s in self.slots}
        result = None
        try:
            for n, chunk in enumerate([due] if whole else self._chunks(due)):
                wanted = {id(s.master) for s in chunk}
                for group, params in zip(groups, given, strict=True):  # this chunk (and, first, every other tensor)
                    group["params"] = [t for t in params if id(t) in wanted or (n == 0 and id(t) not in ours)]
                for slot in chunk:
                    slot.master.data = self.value(slot)
                    self.rebuilt.add(id(slot))
                try:
                    result = run()
                    for slot in chunk:
                        self.put_(slot, slot.master, keep)
                finally:
                    for slot in chunk:
                        slot.master.data = stand_in(slot.param)
                        self.rebuilt.discard(id(slot))
        finally:
            for group, params in zip(groups, given, strict=True):
                group["params"] = params
        for counter in self.steps.values():
            counter.add_(1 if keep is None else (~keep).to(torch.int64))
        return result

    @staticmethod
    def _chunks(slots: list[GradSlot]) -> list[list[GradSlot]]:
        """Consecutive slots in chunks of at most the largest one's number of elements."""
        limit = max(s.param.numel() for s in slots)
        chunks: list[list[GradSlot]] = [[]]
        size = 0
        for slot in slots:
            if chunks[-1] and size + slot.param.numel() > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(slot)
            size += slot.param.numel()
        return chunks

    def stochastic_state(self) -> dict[str, int]:
        """Mode "stochastic"'s seed and applied steps (a host read: for checkpoints)."""
        return {"seed": self.seed, "step": int(next(iter(self.steps.values())))}

    def load_stochastic_state(self, state: dict[str, int]) -> None:
        """Continue the rounding stream of `stochastic_state` (ValueError if it is not one)."""
        if not isinstance(state, dict) or set(state) != {"seed", "step"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in state.values()):
            raise ValueError(f"the state dict's 'stochastic' entry must be {{'seed': int, 'step': int}} with "
                             f"integers >= 0, got {state!r}: it was not saved by MasterWeights")
        self.seed = state["seed"]
        for counter in self.steps.values():
            counter.fill_(state["step"])

    def held_tensors(self) -> list[torch.Tensor]:
        """The buffers that hold the masters between steps (for memory counts and DDP's broadcast).

        A compact remainder (int16) comes as a bfloat16 view of its bytes: gloo and NCCL have no int16,
        and a broadcast copies the bits as they are."""
        return [h.buffer.view(torch.bfloat16) if h.buffer.dtype == torch.int16 else h.buffer
                for h in self.held.values() if h.buffer is not None]

    def restamp_(self) -> None:
        """The parameters as they are now are the ones the buffers belong to (after a broadcast of both)."""
        for slot in self.slots:
            self.held[id(slot)].version = slot.param._version
