"""How a `MasterWeights` takes an optimizer's param groups: which parameters get which master, checked
before anything changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..formats import F32, Format
from ..gradients import GradSlot
from .direct import Rounded, state_in
from .modes import MASTER_MODES, TRANSIENT_MODES, check_mode, check_supported, format_of, parse_param_format
from .transient import stand_in

__all__ = ["Assignment", "Plan", "plan_group", "plan_optimizer", "new_group_params"]


@dataclass(frozen=True)
class Assignment:
    """What MasterWeights was told about its parameters: the format of emulated ones (one for all, or by
    id), and master modes by parameter id (a policy's rules), which a group's ``"master_mode"`` overrides."""

    param_format: Format | None
    formats_by_param: dict[int, Format] | None
    modes_by_param: dict[int, str]

    @classmethod
    def parse(cls, param_format: Any, master_modes: Mapping[torch.Tensor, str] | None) -> Assignment:
        fmt, by_param = parse_param_format(param_format)
        modes = {id(p): check_mode(m, f"master_modes[parameter of shape {tuple(p.shape)}]")
                 for p, m in (master_modes or {}).items()}
        return cls(fmt, by_param, modes)


class Plan:
    """What a param group adds: slots with FP32 masters, slots with transient ones (their modes and the
    parameters' indices), and emulated parameters stepped without masters."""

    def __init__(self) -> None:
        self.fp32: list[GradSlot] = []
        self.low: list[GradSlot] = []
        self.modes: list[str] = []
        self.indices: list[int] = []
        self.rounded: Rounded = []

    def extend(self, other: Plan) -> None:
        for name in ("fp32", "low", "modes", "indices", "rounded"):
            getattr(self, name).extend(getattr(other, name))


def plan_group(params: list[torch.Tensor], group_mode: str | None, default_mode: str, first: int,
               assign: Assignment) -> tuple[list[torch.Tensor], Plan]:
    """For one param group (its parameters numbered from `first`): the tensors the inner optimizer steps,
    and the new slots (with their modes and indices) and rounded parameters. Each parameter's mode: the
    group's (`group_mode`), else its own (`assign`), else `default_mode`. Changes nothing."""
    stepped: list[torch.Tensor] = []
    plan = Plan()
    for index, param in enumerate(params, start=first):
        fmt, emulated = format_of(param, index, assign.param_format, assign.formats_by_param)
        mode = group_mode or assign.modes_by_param.get(id(param), default_mode)
        if mode in MASTER_MODES and fmt is not None and fmt != F32:
            check_supported(mode, fmt, index)
            low = mode in TRANSIENT_MODES
            master = stand_in(param) if low else param.detach().to(torch.float32, copy=True)
            slot = GradSlot(param, master, fmt, emulated)
            if low:
                plan.low.append(slot)
                plan.modes.append(mode)
                plan.indices.append(index)
            else:
                plan.fp32.append(slot)
            stepped.append(master)
        else:
            if mode == "none" and emulated and fmt is not None:
                plan.rounded.append((param, fmt))
            stepped.append(param)
    return stepped, plan


def _group_mode(group: dict[str, Any], where: str) -> str | None:
    return check_mode(group["master_mode"], where) if "master_mode" in group else None


def plan_optimizer(optimizer: torch.optim.Optimizer, default_mode: str, assign: Assignment
                   ) -> tuple[Plan, list[torch.Tensor]]:
    """Plan every param group of `optimizer` (see `plan_group`), and only when all checks passed, point the
    optimizer at the masters. Returns the plan and the model's parameters in order."""
    plan = Plan()
    model_params: list[torch.Tensor] = []
    new_groups: list[list[torch.Tensor]] = []
    for g, group in enumerate(optimizer.param_groups):
        mode = _group_mode(group, f"param group {g}'s 'master_mode'")
        stepped, group_plan = plan_group(group["params"], mode, default_mode, len(model_params), assign)
        model_params += group["params"]
        plan.extend(group_plan)
        new_groups.append(stepped)
    asked = {g.get("master_mode", default_mode) for g in optimizer.param_groups} | set(assign.modes_by_param.values())
    wanted = sorted(asked & set(MASTER_MODES))
    if wanted and not plan.fp32 + plan.low:
        dtypes = sorted({str(p.dtype) for p in model_params})
        raise ValueError(
            f"MasterWeights(mode={wanted[0]!r}) found no 16-bit parameters (dtypes: {', '.join(dtypes)}): "
            f"{wanted[0]} masters of FP32 parameters would do nothing. Use the plain optimizer, cast the "
            f"model to 16 bits first, or pass param_format=mp.F16 (say) to emulate 16-bit "
            f"parameters in FP32 storage")
    # Only now that every check passed, point the inner optimizer at the masters.
    for group, stepped in zip(optimizer.param_groups, new_groups, strict=True):
        lbfgs: Any = optimizer  # LBFGS keeps its group's list as its own _params too
        if getattr(lbfgs, "_params", None) is group["params"]:
            lbfgs._params = stepped
        group["params"] = stepped
    # Existing optimizer state follows its parameter to the master, in FP32 (like load_state_dict).
    for slot in plan.fp32 + plan.low:
        if slot.param in optimizer.state:
            state = optimizer.state.pop(slot.param)
            optimizer.state[slot.master] = state_in(torch.float32, state)
    return plan, model_params


def new_group_params(param_group: Any, known: list[torch.Tensor]) -> tuple[list[torch.Tensor], str | None]:
    """The parameters of a param group given to ``add_param_group``, and its master mode if it names one;
    TypeError or ValueError (a parameter already in a group among `known`) otherwise."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        raise TypeError(f"add_param_group takes a dict with 'params' (and options such as 'lr'), got {param_group!r}")
    given = param_group["params"]
    params = [given] if isinstance(given, torch.Tensor) else list(given)
    ids = {id(p) for p in known}
    twice = [i for i, p in enumerate(params) if id(p) in ids]
    if twice:
        raise ValueError(f"parameter {twice[0]} of the new param group (shape {tuple(params[twice[0]].shape)}) "
                         f"is already in a param group of this optimizer: a parameter belongs to one group")
    return params, _group_mode(param_group, "the new param group's 'master_mode'")
