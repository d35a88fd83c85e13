"""What a `MasterWeights` state dict holds (version 1), and the checks before one is loaded."""

from __future__ import annotations

from typing import Any

import torch

from ..gradients import GradSlot
from ..versions import check_version

__all__ = ["STATE_VERSION", "KEYS", "check_state_dict", "slots_in_order", "has_master_flags"]

STATE_VERSION = 1
KEYS = {"version", "mode", "param_format", "shapes", "has_master", "masters", "optimizer"}
OPTIONAL = {"optimizer_type", "stochastic"}  # "stochastic": mode stochastic's seed and step


def slots_in_order(params: list[torch.Tensor], slots: list[GradSlot]) -> list[GradSlot]:
    """`slots` in the order of their parameters in `params` (the order a state dict's masters are in)."""
    by_param = {id(slot.param): slot for slot in slots}
    return [by_param[id(p)] for p in params if id(p) in by_param]


def has_master_flags(params: list[torch.Tensor], slots: list[GradSlot]) -> list[bool]:
    """For each of `params`, whether one of `slots` (a master) is its."""
    copied = {id(slot.param) for slot in slots}
    return [id(p) in copied for p in params]


def check_state_dict(state_dict: Any, shapes: list[list[int]], has_master: list[bool],
                     optimizer: torch.optim.Optimizer) -> None:
    """Raise a ValueError saying what differs unless `state_dict` was saved by a MasterWeights like this one
    (same version, the same parameters by count and shape, masters on the same ones, the same optimizer
    type). The master mode may differ: the masters are saved in FP32."""
    if not isinstance(state_dict, dict) or set(state_dict) - OPTIONAL != KEYS:
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not a MasterWeights state dict: expected keys {sorted(KEYS)}, got {got}")
    check_version(state_dict["version"], STATE_VERSION, "MasterWeights")
    saved = state_dict["shapes"]
    if len(saved) != len(shapes):
        raise ValueError(
            f"the state dict holds {len(saved)} parameters, this MasterWeights has {len(shapes)}: "
            f"it was saved for a different model or param groups")
    for i, (a, b) in enumerate(zip(saved, shapes, strict=True)):
        if a != b:
            raise ValueError(
                f"parameter {i}: saved shape {tuple(a)}, this MasterWeights has {tuple(b)}: "
                f"the state dict was saved for a different model")
    if state_dict["has_master"] != has_master:
        raise ValueError(
            f"the state dict's masters belong to different parameters (saved with mode={state_dict['mode']!r}; "
            f"their dtypes, the param_format or a mode 'none' group differ): create the model and "
            f"MasterWeights with masters on the same parameters as when it was saved")
    ours, theirs = type(optimizer).__name__, state_dict.get("optimizer_type", type(optimizer).__name__)
    if theirs != ours:  # its state would load silently and fail at the first step (or step wrongly)
        raise ValueError(f"the state dict was saved over a {theirs}, this MasterWeights wraps a {ours}: "
                         f"build the same optimizer as when it was saved")
