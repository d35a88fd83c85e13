"""quantize: the general (bit-arithmetic) path against torch's native casts and an exact reference."""

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec.formats import Format
from mixprec.quantize import quantize_bits

emulate = importlib.import_module("mixprec.quantize")  # the module (mp.quantize is the function)

#: torch 2.6's CPU float8_e4m3fn cast returns NaN where OCP E4M3 saturates at +-448; mixprec then uses its
#: general path (see emulate._EXACT_CASTS), and torch's cast is no reference to compare with.
TORCH_E4M3_SATURATES = emulate._saturates(torch.float8_e4m3fn, 448.0)
needs_saturating_e4m3 = pytest.mark.skipif(not TORCH_E4M3_SATURATES,
                                           reason="this torch's float8_e4m3fn cast does not saturate")
NATIVE = [(mp.F16, torch.float16), (mp.BF16, torch.bfloat16),
          pytest.param(mp.E4M3, torch.float8_e4m3fn, marks=needs_saturating_e4m3), (mp.E5M2, torch.float8_e5m2)]


def general_paths(x, fmt):
    """Every general-path implementation: the dispatching one and the integer one forced."""
    out = torch.empty_like(x)
    emulate._round_on_bits(x, out, fmt, None)
    return [quantize_bits(x, fmt), out]


def assert_same(a, b):
    """Value for value, -0 and +0 told apart, NaN equal to NaN."""
    same = ((a == b) & (a.signbit() == b.signbit())) | (a.isnan() & b.isnan())
    if not bool(same.all()):
        i = (~same).nonzero()[:5, 0]
        raise AssertionError(f"{int((~same).sum())} differ, e.g. got {a[i].tolist()} expected {b[i].tolist()}")


def all_16bit_patterns():
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return torch.cat([patterns.view(torch.float16).float(), patterns.view(torch.bfloat16).float()])


def edge_cases(fmt):
    m, top = fmt.mantissa_bits, fmt.max
    ulp_top = 2.0 ** (fmt.max_exponent - m)
    values = [
        0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0,
        1 + 2.0**-m, 1 + 2.0 ** -(m + 1), 1 + 3 * 2.0 ** -(m + 1), 1 + 2.0 ** -(m + 1) + 2.0**-23,  # ties
        1 - 2.0 ** -(m + 2),  # a tie just below a binade boundary
        top, -top, top + ulp_top / 2, top + ulp_top / 4, top * 1.5, 2 * top, 3.0e38,  # around max
        fmt.min_subnormal, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, fmt.min_subnormal * 1.5,
        fmt.min_subnormal * 2.5, -fmt.min_subnormal / 2, fmt.min_normal, fmt.min_normal * (1 - 2.0**-20),
        fmt.min_normal - fmt.min_subnormal / 2, 1e-45, -1e-45, 1.17549435e-38,
    ]
    return torch.tensor(values, dtype=torch.float32)


def random_fp32(n, seed):
    """Bit patterns drawn uniformly: every exponent of float32, subnormals, inf and NaN included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(
        torch.float32
    )


@pytest.mark.parametrize("fmt,dtype", NATIVE, ids=lambda v: str(v))
def test_general_path_equals_native_cast_on_all_16bit_patterns_random_and_edge_values(fmt, dtype):
    custom = Format("custom", fmt.exponent_bits, fmt.mantissa_bits, has_inf=fmt.has_inf)
    g = torch.Generator().manual_seed(1)
    scaled = torch.randn(1_000_000, generator=g) * torch.exp2(torch.randint(-40, 40, (1_000_000,), generator=g))
    for x in (all_16bit_patterns(), random_fp32(2_000_000, seed=0), scaled, edge_cases(fmt)):
        expected = x.to(dtype).float()
        for got in general_paths(x, custom):
            assert_same(got, expected)


def test_fp8_e4m3_saturates_like_torch_and_e5m2_overflows_to_inf():
    x = torch.tensor([460.0, 1e6, math.inf, -math.inf, math.nan])
    assert_same(mp.quantize(x, mp.E4M3), torch.tensor([448.0, 448.0, 448.0, -448.0, math.nan]))
    assert_same(quantize_bits(x, Format("c", 4, 3, has_inf=False)), torch.tensor([448.0, 448, 448, -448, math.nan]))
    assert_same(mp.quantize(torch.tensor([61439.0, 61440.0]), mp.E5M2), torch.tensor([57344.0, math.inf]))


def reference_round(x: np.ndarray, fmt: Format) -> np.ndarray:
    """Slow exact reference: enumerate every finite value of the format, pick the nearest (ties to even
    mantissa), then apply the overflow rule. float64 holds every float32 and every midpoint exactly."""
    m = fmt.mantissa_bits
    values = [k * 2.0 ** (fmt.min_exponent - m) for k in range(2**m)]  # subnormals and zero
    for e in range(fmt.min_exponent, fmt.max_exponent + 1):
        values += [(2**m + k) * 2.0 ** (e - m) for k in range(2**m)]
    grid = np.array(sorted(v for v in values if v <= fmt.max))
    step_above_max = 2.0 ** (fmt.max_exponent - m)
    grid = np.append(grid, fmt.max + step_above_max)  # the first value past max, for rounding
    a = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    lo_even = (lo % 2 == 0)  # consecutive grid points alternate even/odd mantissas
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~lo_even) | (a >= grid[-1])
    r = np.where(pick_hi, grid[hi], grid[lo])
    r = np.where(a <= grid[0], 0.0, r)
    over = r > fmt.max
    r = np.where(over, np.inf if fmt.has_inf else fmt.max, r)
    r = np.where(np.isinf(a), np.inf if fmt.has_inf else fmt.max, r)
    r = np.copysign(r, x)
    return np.where(np.isnan(x), np.nan, r).astype(np.float32)


CUSTOM = [Format("e2m1", 2, 1), Format("e3m2", 3, 2), Format("e3m2fn", 3, 2, has_inf=False),
          Format("e4m7", 4, 7), Format("e6m5", 6, 5), Format("e2m3fn", 2, 3, has_inf=False),
          Format("e5m0", 5, 0), Format("e3m8", 3, 8, bias=5)]


@pytest.mark.parametrize("fmt", CUSTOM, ids=str)
def test_custom_formats_match_an_exact_reference(fmt):
    g = torch.Generator().manual_seed(2)
    span = fmt.max_exponent - fmt.min_exponent + fmt.mantissa_bits + 6
    x = torch.randn(200_000, generator=g) * torch.exp2(
        torch.randint(fmt.min_exponent - fmt.mantissa_bits - 3, fmt.max_exponent + 3, (200_000,), generator=g)
    )
    assert span > 0
    grid_points = torch.tensor(reference_round(np.linspace(-fmt.max * 1.2, fmt.max * 1.2, 5001), fmt))
    midpoints = (grid_points[1:] + grid_points[:-1]) / 2  # ties, exactly
    for values in (x, midpoints[torch.isfinite(midpoints)], edge_cases(fmt)):
        expected = torch.from_numpy(reference_round(values.numpy(), fmt))
        for got in general_paths(values, fmt):
            assert_same(got, expected)


@settings(max_examples=60, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(CUSTOM + [mp.F16, mp.E4M3]))
def test_quantize_is_idempotent_and_monotone(value, fmt):
    x = torch.tensor([value, value * 1.0001 if math.isfinite(value) else value], dtype=torch.float32)
    q = quantize_bits(x, fmt)
    assert_same(quantize_bits(q, fmt), q)  # values on the grid stay put
    if math.isfinite(value) and value >= 0:
        assert q[0] <= q[1]


def test_quantize_keeps_shape_dtype_device_and_passes_gradient_straight_through():
    x = torch.tensor([[1.0001, -3.3], [1e-9, 7e4]], requires_grad=True)
    y = mp.quantize(x, mp.F16)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.tolist() == [[1.0, -3.30078125], [0.0, math.inf]]
    (y * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    h = mp.quantize(torch.tensor([1.5, 3.3], dtype=torch.float16), mp.E4M3)
    assert h.dtype == torch.float16 and h.tolist() == [1.5, 3.25]
    assert mp.quantize(torch.tensor([1 + 2.0**-30], dtype=torch.float64), "bf16").dtype == torch.float64


def test_fp32_is_the_identity():
    x = random_fp32(10_000, seed=3)
    assert_same(mp.quantize(x, mp.F32), x)


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        mp.quantize(torch.arange(3), mp.F16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mp.quantize([1.0], mp.F16)
    with pytest.raises(ValueError, match="unknown format 'fp9'"):
        mp.quantize(torch.ones(2), "fp9")
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        mp.quantize(torch.ones(2), mp.F16, rounding="up")


# ----- stochastic rounding -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [mp.F16, mp.BF16, mp.E4M3, Format("e3m2", 3, 2)], ids=str)
def test_stochastic_rounding_is_unbiased_and_stays_between_neighbours(fmt):
    # values across normal and subnormal ranges, none on the grid
    base = torch.tensor([1.0 + fmt.eps / 3, -2.5 * fmt.min_subnormal, 0.3 * fmt.min_subnormal,
                         fmt.min_normal * 1.37, fmt.max / 3.1, 10 * fmt.min_subnormal + fmt.min_subnormal / 8])
    draws = 20_000
    x = base.repeat(draws, 1)
    g = torch.Generator().manual_seed(4)
    q = mp.quantize(x, fmt, rounding="stochastic", generator=g)
    below = quantize_toward_zero(base, fmt)
    above = next_away_from_zero(below, fmt)
    assert bool(((q == below) | (q == above)).all()), "stochastic rounding left the two neighbours"
    gap = (above - below).abs()
    p = ((base - below).abs() / gap).double()
    mean = q.double().mean(0)
    # mean of Bernoulli(p) draws: 5 standard errors of tolerance
    tolerance = 5 * gap.double() * torch.sqrt(p * (1 - p) / draws) + 1e-12 * gap.double()
    assert bool(((mean - base.double()).abs() <= tolerance).all()), (mean, base)


def quantize_toward_zero(x, fmt):
    """Largest-magnitude grid value not beyond x: nearest, stepped back if it went past."""
    q = quantize_bits(x, fmt)
    past = q.abs() > x.abs()
    return torch.where(past, step_toward_zero(q, fmt), q)


def step_toward_zero(q, fmt):
    return torch.tensor([_neighbour(v, fmt, -1) for v in q.tolist()])


def next_away_from_zero(q, fmt):
    return torch.tensor([_neighbour(v, fmt, +1) for v in q.tolist()])


def _neighbour(v, fmt, direction):
    a = abs(v)
    e = max(math.floor(math.log2(a)) if a > 0 else fmt.min_exponent, fmt.min_exponent)
    step = 2.0 ** (e - fmt.mantissa_bits)
    if direction < 0 and a == 2.0**e and e > fmt.min_exponent:
        step /= 2
    return math.copysign(a + direction * step, v)


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(100_000)
    a = mp.quantize(x, mp.F16, "stochastic", torch.Generator().manual_seed(7))
    b = mp.quantize(x, mp.F16, "stochastic", torch.Generator().manual_seed(7))
    c = mp.quantize(x, mp.F16, "stochastic", torch.Generator().manual_seed(8))
    assert_same(a, b)
    assert not torch.equal(a, c)
    on_grid = a.half().float()
    assert_same(a, on_grid)


def test_general_path_does_not_depend_on_chunking(monkeypatch):
    x = random_fp32(50_000, seed=5)
    whole = quantize_bits(x, mp.F16, "stochastic", torch.Generator().manual_seed(1))
    monkeypatch.setattr(emulate, "_CHUNK", 1000)
    chunked = quantize_bits(x, mp.F16, "stochastic", torch.Generator().manual_seed(1))
    assert_same(whole, chunked)
    if TORCH_E4M3_SATURATES:
        assert_same(quantize_bits(x, mp.E4M3), x.to(torch.float8_e4m3fn).float())


def test_float64_input_is_rounded_twice_as_torchs_own_cast_does():
    # docs/formats.md: 1 + 2^-11 + 2^-40 rounds to 1 + 2^-10 from float64 directly, but float32 rounds it onto
    # the FP16 midpoint first, which ties to even (1.0); torch's float64 -> float16 cast does the same.
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert x.to(torch.float16).item() == 1.0 and mp.quantize(x, mp.F16).item() == 1.0
    assert mp.quantize(x, mp.F16).dtype == torch.float64
