"""What `mp.prepare` leaves on a model (`PreparedState`), and seeing through the wrappers around it.

Both sides of a prepared model read this module: `mixprec.apply` writes the state, the DDP hook, the
step and the memory report read it; `unwrap` sees through DDP/DataParallel and torch.compile, and
`is_dtensor` / `is_sharded` tell FSDP2's sharded parameters apart, without importing DTensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.hooks import RemovableHandle

from .formats import Format
from .fp8.linear import Fp8Layer
from .gradients import GradSlot
from .master import MasterWeights
from .policy import ModulePrecision, Policy

__all__ = ["PreparedState", "prepared_state", "unwrap", "is_dtensor", "is_sharded"]

_STATE_ATTR = "_mixprec_prepared"


@dataclass
class PreparedState:
    """What `prepare` did to a model: read it with `prepared_state(model)` (reports, memory accounting).

    Attributes:
        policy: the policy applied.
        execution: ``"native"`` or ``"emulated"``: what runs.
        mode: the execution mode, spelled as in policy strings: ``"native"``, ``"emulated"`` (per op) or
            ``"emulated-module"`` (at module boundaries). The code branches on this one spelling.
        emulation: the description reports and ``explain()`` print for an emulated mode, ``"per op"`` or
            ``"module boundaries"`` (see `Policy.emulation`), else None.
        device: the model's device at prepare.
        precisions: per module (named_modules order): params/compute format and why.
        param_formats: qualified parameter name -> storage format of its values (emulated: the grid
            the float32 tensor's values lie on; native: the tensor's dtype).
        in_autocast: whether an `autocast` for this model is open.
        more_master_weights: those `mixprec.prepare_optimizer` made for more optimizers, over other parameters.
        master_weights: the `MasterWeights` prepare wrapped the optimizer in (its gradient hooks are
            removed by `unprepare`), or None.
        sharded: FSDP2 manages the parameters (its sharded FP32 parameters are the masters).
        rounding: per-op emulation: carrier dtype -> the narrower format its values are rounded onto.
        autocast_dtype: the dtype `autocast` enters torch.autocast with (None: it enters none).
        recomputing_in: per-op emulation: the module whose recomputation in backward (activation
            checkpointing) runs under OpEmulation now, and that mode; or None.
        originals: prepared without an optimizer: each 16-bit parameter's FP32 value before rounding
            (by id), which `mixprec.prepare_optimizer` starts the masters from (then None).
        is_copy: this is the state of a copy of a prepared model (``copy.deepcopy``, ``torch.save``, an
            ``AveragedModel``'s): no masters, no hooks of its own; its weights may be wider than their
            formats (an EMA's FP32 averages), and `autocast` rounds them onto their formats for its block.
    """

    policy: Policy
    execution: str
    device: torch.device
    precisions: list[ModulePrecision]
    param_formats: dict[str, Format]
    in_autocast: bool = False
    handles: list[RemovableHandle] = field(default_factory=list, repr=False)
    master_weights: MasterWeights | None = field(default=None, repr=False)
    more_master_weights: list[MasterWeights] = field(default_factory=list, repr=False)
    sharded: bool = False
    rounding: dict[torch.dtype, Format] = field(default_factory=dict, repr=False)
    autocast_dtype: torch.dtype | None = None
    recomputing_in: tuple[torch.nn.Module, Any] | None = field(default=None, repr=False)
    is_copy: bool = False
    originals: dict[int, torch.Tensor] | None = field(default=None, repr=False)
    fp8_layers: dict[str, Fp8Layer] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the model (copy.deepcopy, torch.save, an AveragedModel's) is its weights and the policy:
        # it takes neither the optimizer and its masters nor the hook handles, which belong to the original.
        return {**self.__dict__, "master_weights": None, "more_master_weights": [], "handles": [],
                "recomputing_in": None, "in_autocast": False,
                "is_copy": True, "originals": None}

    @property
    def mode(self) -> str:
        if self.execution == "native":
            return "native"
        return "emulated-module" if self.policy.execution == "emulated-module" else "emulated"

    @property
    def emulation(self) -> str | None:
        return None if self.execution == "native" else self.policy.emulation

    @property
    def grad_slots(self) -> list[GradSlot]:
        """The parameters with FP32 masters and their FP32 gradients (read by the DDP hook)."""
        return [slot for weights in self.all_master_weights for slot in weights.grad_slots]

    @property
    def all_master_weights(self) -> list[MasterWeights]:
        """Every `MasterWeights` of the model: the one prepare (or the first `prepare_optimizer`) made, and
        those of more optimizers prepared for other parameters (a GAN's generator and discriminator)."""
        return ([] if self.master_weights is None else [self.master_weights]) + self.more_master_weights

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: policy string, execution, device, and parameter counts per format."""
        return {"policy": str(self.policy), "execution": self.execution, "mode": self.mode,
                "emulation": self.emulation,
                "device": str(self.device),
                "master": None if self.policy.master is None else self.policy.master_mode,
                "param_formats": {f.name: n for f, n in _count(self.param_formats.values()).items()}}


def _count(formats: Any) -> dict[Format, int]:
    counts: dict[Format, int] = {}
    for fmt in formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def prepared_state(model: torch.nn.Module) -> PreparedState | None:
    """The `PreparedState` of a prepared model, or None.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> import mixprec as mp
        >>> _ = mp.prepare(m, None, "bf16-pure")
        >>> prepared_state(m).execution
        'emulated'
    """
    return getattr(unwrap(model), _STATE_ATTR, None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel, torch.compile and
    ``torch.optim.swa_utils.AveragedModel`` wrappers; others as they are.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> unwrap(torch.compile(m)) is m
        True
    """
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel, AveragedModel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]  # a Module: torch.compile wraps one
        else:
            return model


def _is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` is ``torch.compile(module)``; without importing dynamo (slow, and only loaded
    once something was compiled)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter or gradient shard), without importing DTensor."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages the model's parameters (they are DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())
