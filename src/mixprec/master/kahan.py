"""Mode ``"kahan"``: a 16-bit parameter and a 16-bit compensation buffer holding what rounding it lost.

The master is ``param + compensation`` (FP32 arithmetic); after the update it is split again: the
parameter is the master rounded to its format (nearest even, as an FP32 master's copy-back), the
compensation the rounding error, itself rounded to the format. An update far below half an ulp of the
weight so accumulates in the compensation until it moves the parameter (Kahan summation; torchdistx's
AnyPrecisionAdamW keeps such a buffer). The pair holds about twice the format's mantissa bits (BF16:
16 of FP32's 24), so it is close to, not equal to, an FP32 master. Any 16-bit format with a torch dtype
(BF16, FP16), native or emulated.
"""

from __future__ import annotations

import torch

from ..formats import Format
from ..quantize import quantize

__all__ = ["join", "split_", "compensation_for"]


def compensation_for(param: torch.Tensor) -> torch.Tensor:
    """A zero compensation buffer for `param`, in its dtype."""
    return torch.zeros_like(param, memory_format=torch.contiguous_format)


def join(param: torch.Tensor, compensation: torch.Tensor) -> torch.Tensor:
    """The FP32 master: ``param + compensation`` (a new tensor).

    Example:
        >>> p, c = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)
        >>> split_(torch.tensor([1.0 + 2.0**-12]), p, c, None)
        >>> p.item(), join(p, c).item() == 1.0 + 2.0**-12
        (1.0, True)
    """
    return param.float() + compensation.float()


def _round(x: torch.Tensor, like: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    return x.to(like.dtype) if fmt is None else quantize(x, fmt)


@torch.no_grad()
def split_(master: torch.Tensor, param: torch.Tensor, compensation: torch.Tensor, fmt: Format | None,
           keep: torch.Tensor | None = None) -> None:
    """Store FP32 `master` as `param` and `compensation`, in place. `fmt`: the format emulated float32
    storage holds (None for bfloat16/float16 storage). `keep` (a bool tensor, e.g. found_inf > 0): leave
    both as they are where it is true (a step the optimizer skipped on the device). Syncs: no."""
    rounded = _round(master, param, fmt)
    lost = _round(master - rounded.float(), compensation, fmt)
    lost = torch.where(torch.isfinite(rounded), lost, torch.zeros_like(lost))  # an overflow keeps no compensation
    if keep is not None:
        rounded, lost = torch.where(keep, param, rounded), torch.where(keep, compensation, lost)
    param.copy_(rounded)
    compensation.copy_(lost)
