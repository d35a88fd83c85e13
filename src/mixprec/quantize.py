"""Format emulation: round float tensors onto any Format's grid, exactly.

`quantize` is how mixprec runs a 16-bit (or 8-bit) policy on hardware without that format: values are
rounded onto the format's grid and the arithmetic runs in FP32, which is what the paper did for its
emulated FP16 runs.

Two paths give the same values:

* the general path, vectorised integer arithmetic on the float32 bit pattern, for any Format;
* a fast path through torch's native cast (``x.to(dtype).to(x.dtype)``), used for round-to-nearest
  when torch has the format as a dtype and its cast rounds as the format says (`_EXACT_CASTS`). The
  tests check the two agree value for value.
"""

from __future__ import annotations

from typing import Any

import torch

from .formats import F32, Format

__all__ = ["quantize", "quantize_bits"]

_SIGN = -(2**31)  # 0x80000000 as an int32 mask
_MAGNITUDE = 0x7FFFFFFF
_INF_BITS = 0x7F800000
# Elements per chunk of the general path: ~1 MiB of float32, so the dozen passes over a chunk stay in
# cache instead of streaming the whole tensor through memory a dozen times.
_CHUNK = 1 << 18


def _saturates(dtype: torch.dtype, fmt_max: float) -> bool:
    return torch.tensor([fmt_max * 4]).to(dtype).float().item() == fmt_max


#: torch dtypes whose cast rounds exactly as the format says. float8_e4m3fn must saturate at +-448
#: (OCP); older torch releases (2.6) return NaN on CPU instead, so there the general path is used.
_EXACT_CASTS = {torch.float16, torch.bfloat16, torch.float8_e5m2}
if _saturates(torch.float8_e4m3fn, 448.0):
    _EXACT_CASTS.add(torch.float8_e4m3fn)


def quantize(
    x: torch.Tensor,
    fmt: Format | str,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round every value of ``x`` onto ``fmt``'s grid; the gradient passes straight through.

    Returns a new tensor of ``x``'s shape, dtype and device. Arithmetic is done in float32 (a float64
    input is first rounded to float32). Subnormals of the format are kept (no flush to zero).

    Rounding:
        * ``"nearest"``: round to nearest, ties to even (IEEE default, what hardware casts do).
        * ``"stochastic"``: round to one of the two neighbouring grid values, up with probability equal
          to the distance from the lower one in units of their gap (unbiased: E[q(x)] = x). Draws one
          random 24-bit integer per element from ``generator`` (same generator state -> same result).

    Overflow and specials:
        * Formats with inf (FP16, BF16, E5M2, custom IEEE-like): a value that rounds above ``fmt.max``
          becomes +-inf, as IEEE 754 and torch's casts do; inf stays inf.
        * Formats without inf (E4M3 and custom ``has_inf=False``): values, inf included, saturate to
          +-``fmt.max``, as torch's ``float8_e4m3fn`` cast does.
        * NaN stays NaN; -0 stays -0.
        * With 0 mantissa bits every value is a power of two; a tie goes to the even bit pattern.

    Syncs: no.

    Example:
        >>> import torch, mixprec as mp
        >>> mp.quantize(torch.tensor([1 + 2**-11, 70000.0, 1e-8]), mp.F16)
        tensor([1., inf, 0.])
        >>> mp.quantize(torch.tensor([500.0]), "e4m3")
        tensor([448.])
    """
    fmt = Format.parse(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"quantize expects a floating-point tensor, got dtype {x.dtype}; convert it first, "
            f"e.g. x.float()"
        )
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    rounded: torch.Tensor = _StraightThrough.apply(x, fmt, rounding, generator)
    return rounded


class _StraightThrough(torch.autograd.Function):
    """Forward: round. Backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: Format, rounding: str,
                generator: torch.Generator | None) -> torch.Tensor:
        return _quantize_values(x, fmt, rounding, generator)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


def _quantize_values(x: torch.Tensor, fmt: Format, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    if fmt == F32 and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.clone()  # every value of these dtypes is already an FP32 value
    native = fmt.torch_dtype
    if rounding == "nearest" and native in _EXACT_CASTS and x.dtype != torch.float64:
        # Fast path: torch's cast rounds exactly like the general path (tested value for value).
        return x.to(native).to(x.dtype)
    return quantize_bits(x.float(), fmt, rounding, generator).to(x.dtype)


@torch.no_grad()
def quantize_bits(
    x: torch.Tensor,
    fmt: Format,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The general path of `quantize` for a float32 tensor: integer arithmetic on the bit pattern.

    Never calls a native cast, so it works for any Format; no autograd. Prefer `quantize`. Stochastic
    rounding draws one 24-bit integer per element from `generator`, or takes them from `noise` (an int32
    tensor shaped like `x`, values in [0, 2**24): e.g. a counter-based hash, reproducible on any device).

    Example:
        >>> import torch, mixprec as mp
        >>> quantize_bits(torch.tensor([3.3]), mp.Format("e3m2", 3, 2))
        tensor([3.5000])
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_bits works on float32 tensors, got {x.dtype}")
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    if rounding != "stochastic":
        noise = None
    elif noise is not None:
        noise = noise.reshape(-1)
    else:
        # One 24-bit draw per element, made up front so that the result does not depend on chunking.
        noise = torch.randint(0, 1 << 24, flat.shape, dtype=torch.int32, device=x.device, generator=generator)
    for start in range(0, flat.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        _round_chunk(flat[part], out[part], fmt, None if noise is None else noise[part])
    return out.view(x.shape)


def _round_chunk(x: torch.Tensor, out: torch.Tensor, fmt: Format, noise: torch.Tensor | None) -> None:
    """Round one contiguous float32 chunk of ``x`` onto ``fmt``'s grid, writing into ``out``."""
    drop = 23 - fmt.mantissa_bits
    if noise is None and 0 < drop < 23 and fmt.max_exponent + drop <= 127:
        _round_nearest_by_addition(x, out, fmt)
    else:
        _round_on_bits(x, out, fmt, noise)


def _round_nearest_by_addition(x: torch.Tensor, out: torch.Tensor, fmt: Format) -> None:
    """Round to nearest even with float32's own adder: fewer passes than `_round_on_bits`.

    For x in the binade [2**E, 2**(E+1)), adding c = +-2**(E + drop) moves x into a binade whose float32
    spacing is exactly the format's spacing there, 2**(E - m); float32 rounds the sum to nearest even
    and subtracting c back is exact. Below the format's min normal the spacing stays 2**(emin - m), so
    E is clamped to emin (that is what makes subnormals right). inf and NaN pass through the additions.
    """
    drop = 23 - fmt.mantissa_bits
    exponent = x.view(torch.int32) & _INF_BITS
    exponent.clamp_((fmt.min_exponent + 127) << 23, (fmt.max_exponent + 127) << 23)
    exponent += drop << 23
    c = exponent.view(torch.float32).copysign_(x)
    torch.add(x, c, out=out)
    out.sub_(c).copysign_(x)  # copysign: a negative value that rounds to zero is -0
    if fmt.has_inf:
        # Overflow to inf with two exact power-of-two multiplies: scaled by 2**(127 - emax), every value
        # up to max stays finite in float32 and everything from 2**(emax+1) on becomes inf.
        k = 127 - fmt.max_exponent
        out.mul_(2.0**k).mul_(2.0**-k)
    else:
        out.clamp_(-fmt.max, fmt.max)  # saturate, inf included; NaN stays NaN


def _round_on_bits(x: torch.Tensor, out: torch.Tensor, fmt: Format, noise: torch.Tensor | None) -> None:
    """Round by integer arithmetic on the bit pattern: any format, nearest-even or stochastic."""
    drop = 23 - fmt.mantissa_bits  # float32 mantissa bits the format does not have
    bits = x.view(torch.int32)
    out_bits = out.view(torch.int32)

    # 1. Normal range: drop `drop` low bits of the pattern. Integer addition carries into the exponent
    #    exactly as rounding should (1.11..1 -> 10.0), and on float32 subnormals the same arithmetic is
    #    right too, so formats with float32's exponent range (BF16) need nothing more.
    if drop == 0:
        out_bits.copy_(bits)
    else:
        if noise is None:  # to nearest even: add 0.0111..1 plus the lowest kept bit, then truncate
            torch.bitwise_and(bits >> drop, 1, out=out_bits).add_(bits).add_((1 << (drop - 1)) - 1)
        else:  # stochastic: add a uniform integer in [0, 2**drop): up with probability = remainder
            torch.add(bits, noise >> (24 - drop), out=out_bits)
        out_bits &= -(1 << drop)

    # 2. The format's subnormal range (below 2**emin, when emin > -126): the grid step is fixed at
    #    q = 2**(emin - m). Adding c = 2**23 * q puts x in a binade whose float32 spacing is exactly q,
    #    so float32's own round-to-nearest-even does the rounding; subtracting c again is exact.
    if fmt.min_exponent > -126:
        small = (bits & _MAGNITUDE) < ((fmt.min_exponent + 127) << 23)
        q = 2.0 ** (fmt.min_exponent - fmt.mantissa_bits)
        tiny = x.abs()
        if noise is None:
            c = q * 2.0**23
            tiny = (tiny + c) - c
        else:
            # stochastic: floor to the grid, then up with probability (remainder / q). Scale by
            # 2**(m - emin) in two exact power-of-two steps: the factor itself may exceed float32's range.
            shift = fmt.mantissa_bits - fmt.min_exponent
            steps = tiny * 2.0 ** (shift // 2) * 2.0 ** (shift - shift // 2)
            floor = steps.floor()
            tiny = (floor + ((steps - floor) * 2.0**24 > noise)) * q
        torch.where(small, tiny.copysign(x), out, out=out)

    # 3. Overflow. With float32's top exponent and inf, the carry above already made it inf.
    if not (fmt.has_inf and fmt.max_exponent == 127):
        over = (out_bits & _MAGNITUDE) > _bits_of(fmt.max)
        limit_bits = _INF_BITS if fmt.has_inf else _bits_of(fmt.max)
        torch.where(over, (bits & _SIGN) | limit_bits, out_bits, out=out_bits)
    # 4. NaN stays NaN (the integer rounding may have turned a NaN pattern into inf).
    torch.where(x.isnan(), x, out, out=out)


def _bits_of(value: float) -> int:
    """The float32 bit pattern of ``value`` as a Python int."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))
