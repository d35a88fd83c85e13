"""Number formats: an exact model of any small IEEE-like floating-point format.

A `Format` is sign + `exponent_bits` + `mantissa_bits` (stored bits, the implicit leading one not
counted), an exponent bias, and how the all-ones exponent is used:

* IEEE-like (``has_inf=True``, e.g. FP16, BF16, FP8 E5M2): the all-ones exponent holds inf and NaN.
* "fn" formats (``has_inf=False``, e.g. OCP FP8 E4M3): no inf; the all-ones exponent holds ordinary
  values except the one all-ones bit pattern, which is NaN. This buys one more binade (E4M3: max 448
  instead of 240).

Everything else (max, min_normal, min_subnormal, eps) is derived from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Format", "F32", "F16", "BF16", "E4M3", "E5M2", "FORMATS"]


@dataclass(frozen=True)
class Format:
    """An IEEE-like binary floating-point format with a sign bit.

    Args:
        name: a short name used in tables and strings (``"fp16"``).
        exponent_bits: stored exponent bits, 2..8.
        mantissa_bits: stored mantissa (fraction) bits, 0..23; the implicit leading one is not counted.
        has_inf: IEEE-like (True: the all-ones exponent is inf/NaN) or "fn" (False: no inf, only the
            all-ones bit pattern is NaN, and overflow saturates to +-max).
        bias: exponent bias; default ``2**(exponent_bits - 1) - 1``.

    Example:
        >>> f = Format("fp16ish", 5, 10)
        >>> f.max, f.min_normal, f.min_subnormal, f.eps
        (65504.0, 6.103515625e-05, 5.960464477539063e-08, 0.0009765625)
    """

    name: str = field(compare=False)  # formats are equal when their values and rules are
    exponent_bits: int
    mantissa_bits: int
    has_inf: bool = True
    bias: int = field(default=None)  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if not isinstance(self.exponent_bits, int) or not 2 <= self.exponent_bits <= 8:
            raise ValueError(
                f"exponent_bits must be an integer in 2..8 (wider exponents do not fit in float32 "
                f"emulation), got {self.exponent_bits!r}"
            )
        if not isinstance(self.mantissa_bits, int) or not 0 <= self.mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be an integer in 0..23, got {self.mantissa_bits!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exponent_bits - 1) - 1)
        if not isinstance(self.bias, int):
            raise ValueError(f"bias must be an integer, got {self.bias!r}")
        # The emulation works on float32 values, so the format's range must lie inside float32's.
        if self.min_exponent < -126 or self.max_exponent > 127:
            raise ValueError(
                f"format {self.name!r} with bias {self.bias} has exponents "
                f"{self.min_exponent}..{self.max_exponent}, outside float32's -126..127, which the "
                f"emulation needs: choose a bias that keeps both ends inside that range"
            )
        if not self.has_inf and self.exponent_bits + self.mantissa_bits < 2:
            raise ValueError("an 'fn' format (has_inf=False) needs at least 2 exponent+mantissa bits")

    # ----- derived quantities -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total storage bits: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (``emin``)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite number (``emax``)."""
        top: int = 2**self.exponent_bits - 1  # all-ones exponent field
        if self.has_inf:
            return top - 1 - self.bias
        # fn: the all-ones exponent holds values unless its only non-NaN pattern would be the NaN one.
        return top - self.bias if self.mantissa_bits > 0 else top - 1 - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m = self.mantissa_bits
        top_mantissa = 2**m - 1
        if not self.has_inf and m > 0:
            top_mantissa -= 1  # all-ones mantissa at the all-ones exponent is NaN
        return float((1 + top_mantissa / 2**m) * 2.0**self.max_exponent)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**emin``."""
        return float(2.0**self.min_exponent)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value, ``2**(emin - mantissa_bits)``."""
        return float(2.0 ** (self.min_exponent - self.mantissa_bits))

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1 and the next value, ``2**-mantissa_bits``."""
        return float(2.0**-self.mantissa_bits)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this format's values and rules, if torch has one."""
        for dtype, fmt in _native_formats().items():
            if fmt == self:
                return dtype
        return None

    # ----- strings ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Format) -> Format:
        """Look up a named format (case-insensitive, with the usual aliases), or pass a Format through.

        Also accepts ``"e<E>m<M>"`` for an IEEE-like custom format (``"e3m4"``), ``"e<E>m<M>fn"``
        for one without inf, and a ``"_bias<B>"`` suffix for a bias other than the IEEE one.

        Example:
            >>> Format.parse("half") == F16, Format.parse("fp8_e4m3").max
            (True, 448.0)
        """
        if isinstance(text, Format):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a format is given as a name or a Format, got {type(text).__name__}")
        key = text.strip().lower().replace("-", "_")
        if key in _ALIASES:
            return _ALIASES[key]
        custom = _parse_custom(key)
        if custom is not None:
            return custom
        valid = ", ".join(sorted({k for k in _ALIASES}))
        raise ValueError(
            f"unknown format {text!r}; valid names: {valid}; or 'e<E>m<M>' (IEEE-like) / "
            f"'e<E>m<M>fn' (no inf) for a custom format, e.g. 'e3m4', with '_bias<B>' for another bias"
        )

    def __str__(self) -> str:
        return self.name

    @property
    def spec(self) -> str:
        """A text `Format.parse` reads back to an equal format: the name when it does, else
        ``e<E>m<M>[fn][_bias<B>]`` (used in policy strings).

        Example:
            >>> F16.spec, Format("e4m3b", 4, 3, has_inf=False, bias=8).spec
            ('fp16', 'e4m3fn_bias8')
        """
        try:
            if Format.parse(self.name) == self:
                return self.name
        except ValueError:
            pass
        text = f"e{self.exponent_bits}m{self.mantissa_bits}" + ("" if self.has_inf else "fn")
        return text + ("" if self.bias == 2 ** (self.exponent_bits - 1) - 1 else f"_bias{self.bias}")


def _parse_custom(key: str) -> Format | None:
    import re

    match = re.fullmatch(r"e(\d+)m(\d+)(fn)?(?:_bias(_?)(\d+))?", key)  # '-' was turned into '_'
    if match is None:
        return None
    e, m, fn = int(match[1]), int(match[2]), bool(match[3])
    bias = 2 ** (e - 1) - 1 if match[5] is None else int(match[5]) * (-1 if match[4] else 1)
    for fmt in FORMATS.values():  # a custom spelling of a named format is that format
        if (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf, fmt.bias) == (e, m, not fn, bias):
            return fmt
    return Format(key, e, m, has_inf=not fn, bias=bias)


F32 = Format("fp32", 8, 23)
F16 = Format("fp16", 5, 10)
BF16 = Format("bf16", 8, 7)
E4M3 = Format("e4m3", 4, 3, has_inf=False)
E5M2 = Format("e5m2", 5, 2)

#: The named formats, by canonical name.
FORMATS: dict[str, Format] = {f.name: f for f in (F32, F16, BF16, E4M3, E5M2)}

_ALIASES: dict[str, Format] = {
    **FORMATS,
    **dict.fromkeys(["f32", "float32", "float", "single"], F32),
    **dict.fromkeys(["f16", "float16", "half", "binary16"], F16),
    **dict.fromkeys(["bfloat16", "brain"], BF16),
    **dict.fromkeys(["fp8_e4m3", "float8_e4m3", "float8_e4m3fn", "e4m3fn", "fp8e4m3"], E4M3),
    **dict.fromkeys(["fp8_e5m2", "float8_e5m2", "fp8e5m2"], E5M2),
}


def _native_formats() -> dict[torch.dtype, Format]:
    """torch dtypes whose values and rounding are exactly those of a named Format."""
    table = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
    if hasattr(torch, "float8_e4m3fn"):
        table[torch.float8_e4m3fn] = E4M3
    if hasattr(torch, "float8_e5m2"):
        table[torch.float8_e5m2] = E5M2
    return table
