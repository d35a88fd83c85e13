"""The FP32 view of a prepared model's weights: each parameter's master where it has one.

What an EMA averages (`mixprec.AveragedModel`) and what a checkpoint keeps of the weights
(`fp32_state_dict`): the values the optimizer steps, in FP32, whatever the master mode (an FP32 copy, a
compact remainder, a Kahan compensation) and whatever the parameters are stored in.
"""

from __future__ import annotations

from typing import Any

import torch

from .state import prepared_state, unwrap

__all__ = ["fp32_weights", "fp32_state_dict"]


def fp32_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The FP32 value of each of ``model.parameters()``: its master where it has one and the master still
    rounds to it, else the parameter (widened to FP32 if narrower). Reads only; no host sync."""
    model = unwrap(model)
    state = prepared_state(model)
    slots = {id(slot.param): (weights, slot) for weights in ([] if state is None else state.all_master_weights)
             for slot in weights.grad_slots}
    values = []
    with torch.no_grad():
        for p in model.parameters():
            found = slots.get(id(p))
            value = p.detach() if found is None else found[0].master_value(found[1])
            if value.is_floating_point() and value.element_size() < 4:
                value = value.to(torch.float32)
            values.append(value)
    return values


def fp32_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with each parameter's FP32 value (`fp32_weights`): a plain FP32 model of the
    same architecture loads it (``load_state_dict``), and so does the prepared model (rounding each value
    into its parameter; its optimizer's state dict then restores the masters' every bit).

    Syncs: no.

    Example:
        >>> import mixprec as mp
        >>> model = torch.nn.Linear(2, 1)
        >>> model, opt, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-master")
        >>> sd = mp.fp32_state_dict(model)
        >>> sd["weight"].dtype, torch.nn.Linear(2, 1).load_state_dict(sd) is not None
        (torch.float32, True)
    """
    inner = unwrap(model)
    values = {id(p): v for p, v in zip(inner.parameters(), fp32_weights(inner), strict=True)}
    state = inner.state_dict()
    for name, p in inner.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = values[id(p)]
    return state
