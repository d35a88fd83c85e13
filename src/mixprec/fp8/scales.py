"""Scaled casts onto FP8: the scales of every granularity, the saturating cast, and back.

A 2-D operand of a matmul is cut into blocks along its contraction dimension (`block_shape`): the
whole tensor (tensorwise, delayed), one row of it (rowwise), 1 x 128 or 128 x 128 tiles (blockwise), or
1 x 32 blocks (mx). Each block's scale ``s`` maps its amax onto the format's max; the FP8 bits are
``saturate(x * s)`` in torch's float8 dtype and the value they stand for is ``bits / s``, exactly as
torchao.float8 (tensorwise, rowwise) and torchao.prototype.mx_formats (mx, "floor" scales) compute them.
Finite values beyond the max saturate; an inf or NaN becomes NaN whatever the scale, so a non-finite
input gives non-finite products (and a step that skips) rather than finite garbage. The rounding is done in
FP32 (`on_grid`, bitwise torch's cast), the float8 tensor made only where needed (`Scaled.bits`).

Example:
    >>> x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    >>> c = scaled_cast(x, torch.float8_e4m3fn, "tensorwise", dim=1)
    >>> c.scale.item(), c.bits.float().abs().max().item(), c.dequantize().tolist()
    (112.0, 448.0, [[1.0, -2.0], [0.5, 4.0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Scaled", "scaled_cast", "on_grid", "amax_to_scale", "mx_scale", "block_shape", "block_amax", "expand",
           "FP8_DTYPES", "EPS"]

#: torchao's floor under an amax before dividing by it.
EPS = 1e-12
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_MAX_POW2 = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}  # largest power of two <= the format's max


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """``max(dtype) / max(amax, EPS)`` computed in FP64 and rounded to FP32; `pow2` rounds it down to a
    power of two. Syncs: no.

    Example:
        >>> amax_to_scale(torch.tensor(3.0), torch.float8_e4m3fn).item(), amax_to_scale(
        ...     torch.tensor(3.0), torch.float8_e4m3fn, pow2=True).item()
        (149.3333282470703, 128.0)
    """
    scale = (torch.finfo(dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)
    return torch.exp2(torch.floor(torch.log2(scale))) if pow2 else scale


def mx_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The multiplier of an MX block (the inverse of its E8M0 scale): ``2**(emax_elem - floor(log2(amax)))``,
    with the shared exponent kept in E8M0's range and the E8M0 scale at least 2**-126 (torchao's "floor").

    Example:
        >>> mx_scale(torch.tensor([3.0, 448.0, 0.0]), torch.float8_e4m3fn).tolist()
        [128.0, 1.0, 8.507059173023462e+37]
    """
    amax = amax.to(torch.float32)
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2) of a normal amax, from its bits
    shared = torch.clamp(exponent - _MAX_POW2[dtype], min=-127, max=128)
    divisor = torch.clamp(torch.exp2(shared.to(torch.float32)), min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isnan(amax), amax, 1.0 / divisor)


def block_shape(granularity: str, shape: tuple[int, int], dim: int, weight: bool, block: int) -> tuple[int, int]:
    """The blocks one scale covers in a 2-D operand of `shape` contracted along `dim` (0 or 1).

    Example:
        >>> block_shape("rowwise", (4, 8), 1, False, 0), block_shape("blockwise", (256, 256), 0, True, 128)
        ((1, 8), (128, 128))
    """
    if granularity in ("tensorwise", "delayed"):
        return shape
    length = shape[dim] if granularity == "rowwise" else block
    if granularity == "blockwise" and weight:
        return (block, block)
    return (1, length) if dim == 1 else (length, 1)


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The amax of every `block` of a 2-D tensor, shape ``(ceil(rows / b0), ceil(cols / b1))`` (a ragged edge
    block covers what is there). Syncs: no."""
    rows, cols = x.shape
    b0, b1 = block
    if (b0, b1) == (rows, cols):
        return x.abs().amax().reshape(1, 1)
    pad = (0, -cols % b1, 0, -rows % b0)
    padded = torch.nn.functional.pad(x.abs(), pad) if any(pad) else x.abs()
    r, c = padded.shape
    return padded.reshape(r // b0, b0, c // b1, b1).amax(dim=(1, 3))


def expand(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-block `scale` spread over the elements of a tensor of `shape` (a view where it can be)."""
    if scale.shape == (1, 1):
        return scale
    b0, b1 = block
    if b0 == 1 and b1 == shape[1] or b1 == 1 and b0 == shape[0]:
        return scale  # one scale per row or column: broadcasts as it is
    full = scale.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
    return full[: shape[0], : shape[1]]


_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, smallest normal exponent


def on_grid(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round FP32 `x` to nearest even onto the FP8 `dtype`'s values, in FP32: values beyond the max (inf
    too) saturate, NaN stays NaN. Bitwise what ``clamp(x, -max, max).to(dtype).float()`` gives (signed zeros
    too), without torch's float8 conversions (slow on CPUs: 5-10x a multiply). Syncs: no.

    Example:
        >>> on_grid(torch.tensor([0.30, 17.0, 500.0, -float("inf")]), torch.float8_e4m3fn).tolist()
        [0.3125, 16.0, 448.0, -448.0]
    """
    mantissa, emin = _GRID[dtype]
    top = torch.finfo(dtype).max
    clamped = torch.clamp(x, -top, top)
    # Adding 1.5 * 2**(23 - mantissa) times the value's binade (at least the smallest normal's: subnormals)
    # leaves exactly the FP8 value's bits in FP32's mantissa, rounded to nearest even by the addition.
    binade = (clamped.view(torch.int32) & 0x7F800000).view(torch.float32)
    magic = torch.clamp(binade, min=2.0**emin) * (1.5 * 2.0 ** (23 - mantissa))
    return torch.copysign((clamped + magic) - magic, clamped)


@dataclass
class Scaled:
    """A tensor cast onto FP8: its scaled `values` on the format's grid (FP32), the per-block `scale` they
    were multiplied by, the `block` one scale covers, and the FP8 `dtype`; `bits` are the float8 tensor."""

    values: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    dtype: torch.dtype

    @property
    def bits(self) -> torch.Tensor:
        """The FP8 tensor (exact: the values are on its grid)."""
        return self.values.to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The FP32 values the bits stand for, ``bits / scale`` (torchao's emulated matmul operand)."""
        rows, cols = self.values.shape
        return self.values / expand(self.scale, self.block, (rows, cols))


def scaled_cast(x: torch.Tensor, dtype: torch.dtype, granularity: str, dim: int, *, weight: bool = False,
                block: int = 0, pow2: bool = False, scale: torch.Tensor | None = None) -> Scaled:
    """Cast a 2-D `x` onto the FP8 `dtype` with scales of `granularity` along its contraction dim `dim`.

    `weight` picks the weights' blocks (blockwise: 128 x 128 tiles); `scale`, if given (delayed scaling),
    is used instead of one computed from `x`. Syncs: no.

    Example:
        >>> c = scaled_cast(torch.tensor([[1.0, 96.0], [1.0, 0.5]]), torch.float8_e4m3fn, "rowwise", dim=1, pow2=True)
        >>> c.scale.flatten().tolist(), c.dequantize().tolist()
        ([4.0, 256.0], [[1.0, 96.0], [1.0, 0.5]])
    """
    if x.dim() != 2:
        raise ValueError(f"scaled_cast takes a 2-D operand, got shape {tuple(x.shape)}")
    shape = (x.shape[0], x.shape[1])
    blocks = block_shape(granularity, shape, dim, weight, block)
    if scale is None:
        amax = block_amax(x.detach(), blocks).to(torch.float32)
        scale = mx_scale(amax, dtype) if granularity == "mx" else amax_to_scale(amax, dtype, pow2)
    # Finite values beyond the max saturate (torchao's cast), also where x * scale overflows FP32 (a delayed
    # scale from smaller amaxes); an inf in x becomes NaN, also where the scale did not come from it (delayed
    # scaling, a block's power of two), so the step skips.
    finite = torch.nan_to_num(x.detach().to(torch.float32), nan=math.nan, posinf=math.nan, neginf=math.nan)
    scaled = finite * expand(scale, blocks, shape)
    return Scaled(on_grid(scaled, dtype), scale, blocks, dtype)
