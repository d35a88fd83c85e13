"""Mode ``"none"``: the optimizer steps the 16-bit parameters themselves (the paper's "without master
weights" ablation, and the pure presets).

Real 16-bit parameters need nothing here. Emulated ones (FP32 storage holding a format's values) are
kept on their format: their gradients are rounded onto it, the optimizer steps a copy in the format's
torch dtype where it has one (f16, bf16: so that the optimizer's arithmetic is 16-bit, as on a device
with the format), and formats no optimizer can step in (FP8) are rounded after the update.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Format
from ..gradients import rounding_hook
from ..quantize import quantize

__all__ = ["DirectSteps", "Rounded", "STEPPED_IN_16_BITS", "state_in"]

STEPPED_IN_16_BITS = (torch.float16, torch.bfloat16)  # the dtypes optimizers step emulated parameters in

#: (parameter, the format its values are on) for each emulated parameter stepped without a master
Rounded = list[tuple[torch.Tensor, Format]]
#: (the param group's list, the position in it, the FP32 parameter, its 16-bit stand-in for the update)
Carried = list[tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor]]


def state_in(dtype: torch.dtype, state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state following its parameter's dtype: floating state takes `dtype`, "step" stays as is."""
    return {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() and key != "step"
            else value for key, value in state.items()}


class DirectSteps:
    """The emulated parameters of a `MasterWeights` stepped without masters, and their format.

    Args:
        rounded: (parameter, the format its values are on) for each emulated parameter in mode "none".
    """

    def __init__(self, rounded: Rounded) -> None:
        self.rounded = list(rounded)

    def register_hooks(self, rounded: Rounded) -> list[Any]:
        """A hook rounding the gradient of each trainable parameter of `rounded` onto its format; returns
        the handles."""
        return [param.register_post_accumulate_grad_hook(rounding_hook(fmt))
                for param, fmt in rounded if param.requires_grad]

    def round_grads_(self) -> None:
        """Round the gradients onto the formats (idempotent if the hook already did)."""
        for param, fmt in self.rounded:
            if param.grad is not None:
                param.grad.copy_(quantize(param.grad, fmt))

    def carry_in_16_bits(self, optimizer: torch.optim.Optimizer) -> Carried:
        """Put in `optimizer`, for the update, a copy of each parameter whose format has a torch dtype (f16,
        bf16) in that dtype, with its gradient and state. The Parameter itself is left alone (a new .data
        would cut it from DDP's hooks). Returns what `put_back` restores."""
        formats = {id(p): fmt for p, fmt in self.rounded if fmt.torch_dtype in STEPPED_IN_16_BITS}
        carried: Carried = []
        state = optimizer.state
        for group in optimizer.param_groups if formats else ():
            params = group["params"]
            for i, param in enumerate(params):
                if id(param) in formats:
                    dtype = formats[id(param)].torch_dtype
                    assert dtype is not None  # f16 or bf16: STEPPED_IN_16_BITS
                    low = param.detach().to(dtype)
                    low.grad = None if param.grad is None else param.grad.to(dtype)
                    if param in state:
                        state[low] = state_in(dtype, state.pop(param))
                    params[i] = low
                    carried.append((params, i, param, low))
        return carried

    @staticmethod
    def put_back(optimizer: torch.optim.Optimizer, carried: Carried) -> None:
        """Back into the FP32 parameters: the updated values (on the grid, exactly) and their state."""
        state = optimizer.state
        for params, i, param, low in carried:
            params[i] = param
            param.copy_(low)
            if low in state:
                state[param] = state.pop(low)

    def round_after_step_(self) -> None:
        """Round the parameters whose format no optimizer steps in (FP8) back onto it."""
        for param, fmt in self.rounded:
            if fmt.torch_dtype not in STEPPED_IN_16_BITS:
                param.copy_(quantize(param, fmt))
