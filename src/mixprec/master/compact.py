"""Mode ``"compact"``: a BF16 parameter and the low 16 bits of its FP32 master, 4 bytes a parameter.

The FP32 master is never stored: its high 16 bits are the parameter, and an int16 remainder holds the rest,
``master_bits = (param_bits << 16) + remainder``. Splitting rounds the parameter to the nearest BF16 value,
with ties away from zero (add half a BF16 ulp to the bit pattern, keep its top 16 bits), so the remainder
is in [-2^15, 2^15) and the master comes back exactly, every bit (Megatron-LM's ``store_param_remainders``
idea). Only at an exact tie does the parameter differ from round-to-nearest-even, which 16 bits cannot
give for every master: a BF16 value with an even last bit is nearest to 2^16 + 1 FP32 values.

Works for BF16 parameters, native (bfloat16 storage) or emulated (float32 storage holding BF16 values).
"""

from __future__ import annotations

import torch

__all__ = ["join", "split_", "remainder_for"]

_HALF_ULP = 1 << 15  # half a BF16 ulp, in FP32 bit-pattern units
_HIGH = -(1 << 16)  # 0xFFFF0000 as an int32: the top 16 bits


def remainder_for(param: torch.Tensor) -> torch.Tensor:
    """A zero remainder for `param` (its master is then the parameter's value)."""
    return torch.zeros(param.shape, dtype=torch.int16, device=param.device)


def _high_bits(param: torch.Tensor) -> torch.Tensor:
    """The parameter's value as the top 16 bits of an FP32 bit pattern (int32)."""
    if param.dtype == torch.bfloat16:
        return param.view(torch.int16).to(torch.int32) << 16
    return param.view(torch.int32)  # float32 storage on the BF16 grid: the low 16 bits are zero


def join(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The exact FP32 master of `param` and its `remainder` (a new tensor).

    Example:
        >>> p, r = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.int16)
        >>> split_(torch.tensor([1.0 + 2.0**-20]), p, r); join(p, r).item() == 1.0 + 2.0**-20
        True
    """
    return (_high_bits(param) + remainder.to(torch.int32)).view(torch.float32)


@torch.no_grad()
def split_(master: torch.Tensor, param: torch.Tensor, remainder: torch.Tensor) -> None:
    """Store FP32 `master` as `param` (BF16, nearest, ties away from zero) and `remainder` (int16), in place.

    NaN stays NaN (the parameter takes the canonical BF16 NaN). Syncs: no.
    """
    bits = master.view(torch.int32)
    high = (bits + _HALF_ULP) & _HIGH  # a magnitude rounded up at half an ulp: carries into the exponent
    high = torch.where(master.isnan(), torch.full_like(bits, 0x7FC00000), high)  # NaN may carry into the sign
    if param.dtype == torch.bfloat16:
        param.view(torch.int16).copy_(high >> 16)
    else:
        param.view(torch.int32).copy_(high)
    remainder.copy_(bits - high)  # in [-2^15, 2^15) for every non-NaN master
