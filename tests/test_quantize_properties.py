"""quantize's invariants, property-based (hypothesis), for every kind of format: named 16- and 8-bit ones
and custom ones (no inf, no mantissa, an odd bias). test_quantize.py checks values against torch's casts
and an exact reference; these check the rules any rounding onto a grid must keep, on any float32:

idempotent, monotone, sign-symmetric, every finite result on the format's grid, round-to-nearest within
half a grid step, the overflow rules (inf, or saturation for formats without inf), NaN kept, and
stochastic rounding landing on one of the two neighbouring grid values."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec.formats import Format

FORMATS = [mp.F16, mp.BF16, mp.E4M3, mp.E5M2, Format("e2m1", 2, 1), Format("e3m2fn", 3, 2, has_inf=False),
           Format("e5m0", 5, 0), Format("e3m8", 3, 8, bias=5), Format("e4m7", 4, 7)]
formats = st.sampled_from(FORMATS)
float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)
finite32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


def q(value: float, fmt: Format) -> float:
    return mp.quantize(torch.tensor([value], dtype=torch.float32), fmt).item()


def same(a: float, b: float) -> bool:
    """Equal bit for bit as values: -0 and +0 told apart, NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def spacing(x: float, fmt: Format) -> float:
    """The grid step of ``fmt`` around ``x`` (in the binade of x, or the subnormal step below emin)."""
    e = max(math.floor(math.log2(abs(x))) if x else fmt.min_exponent, fmt.min_exponent)
    return 2.0 ** (e - fmt.mantissa_bits)


def on_grid(v: float, fmt: Format) -> bool:
    if v == 0:
        return True
    if abs(v) > fmt.max:
        return False
    step = spacing(v, fmt)
    return (v / step).is_integer() and math.floor(math.log2(abs(v))) <= fmt.max_exponent


@settings(max_examples=300, deadline=None)
@given(float32s, formats)
def test_idempotent_nan_kept_and_every_finite_result_on_the_grid(x, fmt):
    y = q(x, fmt)
    assert same(q(y, fmt), y)
    assert math.isnan(y) == math.isnan(x)
    if math.isfinite(y):
        assert on_grid(y, fmt), (x, y)
    else:
        assert fmt.has_inf or math.isnan(y)  # formats without inf never make one


@settings(max_examples=300, deadline=None)
@given(float32s, formats)
def test_sign_symmetric(x, fmt):
    assert same(q(-x, fmt), -q(x, fmt))


@settings(max_examples=300, deadline=None)
@given(finite32s, finite32s, formats)
def test_monotone(x, y, fmt):
    lo, hi = sorted((x, y))
    assert q(lo, fmt) <= q(hi, fmt)


@settings(max_examples=300, deadline=None)
@given(finite32s, formats)
def test_nearest_is_within_half_a_grid_step_in_range(x, fmt):
    assume(abs(x) <= fmt.max)
    y = q(x, fmt)
    assert abs(y - x) <= spacing(x, fmt) / 2, (x, y)  # float64 holds these differences exactly


@settings(max_examples=300, deadline=None)
@given(float32s, formats)
def test_overflow_rules(x, fmt):
    top_step = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
    threshold = fmt.max + top_step / 2  # halfway from max to the next (missing) grid value
    assume(math.isnan(x) or abs(x) != threshold)  # the tie goes to the even pattern: format-dependent
    y = q(x, fmt)
    if math.isnan(x):
        assert math.isnan(y)
    elif abs(x) > threshold:  # inf included
        assert y == math.copysign(math.inf if fmt.has_inf else fmt.max, x)
    else:
        assert math.isfinite(y) and abs(y) <= fmt.max


@settings(max_examples=200, deadline=None)
@given(finite32s, formats, st.integers(0, 2**31))
def test_stochastic_rounding_lands_on_a_neighbouring_grid_value(x, fmt, seed):
    assume(abs(x) <= fmt.max)
    generator = torch.Generator().manual_seed(seed)
    y = mp.quantize(torch.tensor([x]), fmt, rounding="stochastic", generator=generator).item()
    assert on_grid(y, fmt) and abs(y - x) < spacing(x, fmt) or y == x, (x, y)
    if on_grid(x, fmt):
        assert y == x  # a value on the grid stays put
