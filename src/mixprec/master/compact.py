"""Mode ``"compact"``: a BF16 parameter and the low 16 bits of its FP32 master, 4 bytes a parameter.

The FP32 master is never stored: its high 16 bits are the parameter, and an int16 remainder holds the rest,
``master_bits = (param_bits << 16) + remainder`` (Megatron-LM's ``store_param_remainders`` idea). The
parameter is the master rounded to nearest even, exactly what an FP32 master's copy-back gives, so the
model computes with the same weights as under mode "fp32", bit for bit. The master comes back exactly,
every bit, with one exception 16 bits cannot avoid: a BF16 value whose last bit is even is the nearest
to 2^16 + 1 FP32 values, and the one exactly half an ulp above it (in magnitude) is kept one FP32 ulp
(2^-24 relative) below, where it still rounds to the same parameter. Such a master is one update in
2^17 or so; the alternative, rounding that tie away from zero, would keep every master but change a
weight the model computes with.

Works for BF16 parameters, native (bfloat16 storage) or emulated (float32 storage holding BF16 values).
"""

from __future__ import annotations

import torch

__all__ = ["join", "split_", "remainder_for"]

_HALF_ULP = 1 << 15  # half a BF16 ulp, in FP32 bit-pattern units


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
    """Store FP32 `master` as `param` (BF16, to nearest even) and `remainder` (int16), in place.

    The remainder is in [-2^15, 2^15] before it is stored; +2^15 (the tie above an even BF16 value) is
    kept as 2^15 - 1 (see the module's docstring). NaN stays NaN. Syncs: no.
    """
    bits = master.view(torch.int32)
    nearest = master.to(torch.bfloat16)
    high = nearest.view(torch.int16).to(torch.int32) << 16
    if param.dtype == torch.bfloat16:
        param.copy_(nearest)
    else:
        param.view(torch.int32).copy_(high)
    remainder.copy_((bits - high).clamp_(-_HALF_ULP, _HALF_ULP - 1))
