"""Format: derived quantities against the published tables and torch.finfo, parsing, bad input."""

import pytest
import torch

import mixprec as mp
from mixprec.formats import Format

# PAPER.md's format table, and float32's.
PUBLISHED = {
    # name: (exponent bits, mantissa bits, max, min normal, min subnormal, eps)
    "fp16": (5, 10, 65504.0, 2.0**-14, 2.0**-24, 2.0**-10),
    "bf16": (8, 7, 3.3895313892515355e38, 2.0**-126, 2.0**-133, 2.0**-7),
    "e4m3": (4, 3, 448.0, 2.0**-6, 2.0**-9, 2.0**-3),
    "e5m2": (5, 2, 57344.0, 2.0**-14, 2.0**-16, 2.0**-2),
    "fp32": (8, 23, 3.4028234663852886e38, 2.0**-126, 2.0**-149, 2.0**-23),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_formats_match_the_published_table(name):
    fmt = mp.FORMATS[name]
    e, m, fmax, normal, subnormal, eps = PUBLISHED[name]
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bits) == (e, m, 1 + e + m)
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.eps) == (fmax, normal, subnormal, eps)


@pytest.mark.parametrize("fmt", list(mp.FORMATS.values()), ids=str)
def test_named_formats_agree_with_torch_finfo(fmt):
    dtype = fmt.torch_dtype
    assert dtype is not None
    info = torch.finfo(dtype)
    assert fmt.max == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.eps == info.eps
    assert fmt.bits == info.bits
    # the smallest subnormal is representable and half of it is not
    tiny = torch.tensor([fmt.min_subnormal, fmt.min_subnormal / 2], dtype=torch.float32).to(dtype).float()
    assert tiny.tolist() == [fmt.min_subnormal, 0.0]


def test_custom_formats_have_no_torch_dtype_unless_equal_to_a_named_one():
    assert Format("x", 5, 10).torch_dtype == torch.float16  # the same format under another name
    assert Format("x", 3, 4).torch_dtype is None
    assert Format("x", 4, 3).torch_dtype is None  # IEEE-like e4m3 (with inf) is not e4m3fn


def test_fn_format_gains_a_binade_and_loses_one_pattern():
    ieee, fn = Format("a", 4, 3), Format("b", 4, 3, has_inf=False)
    assert ieee.max == 240.0 and fn.max == 448.0
    assert Format("c", 2, 1, has_inf=False).max == 2.0 ** 2 * 1.0  # exponent 11, mantissa 0 (1 is NaN)


@pytest.mark.parametrize(
    "alias,expected",
    [("fp16", mp.F16), ("float16", mp.F16), ("half", mp.F16), ("F16", mp.F16), ("bf16", mp.BF16),
     ("bfloat16", mp.BF16), ("e4m3", mp.E4M3), ("fp8_e4m3", mp.E4M3), ("float8_e4m3fn", mp.E4M3),
     ("e5m2", mp.E5M2), ("fp8-e5m2", mp.E5M2), ("fp32", mp.F32), ("float32", mp.F32), ("e5m10", mp.F16)],
)
def test_parse_aliases(alias, expected):
    assert Format.parse(alias) == expected
    assert Format.parse(expected) is expected


def test_parse_custom_spelling():
    fmt = Format.parse("e3m4")
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf) == (3, 4, True)
    assert not Format.parse("e3m4fn").has_inf


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown format 'fp17'.*valid names:.*bf16.*fp16"):
        Format.parse("fp17")
    with pytest.raises(TypeError, match="name or a Format"):
        Format.parse(16)


@pytest.mark.parametrize("e,m", [(1, 10), (9, 3), (0, 0), (5, 24), (5, -1), (2.5, 3)])
def test_impossible_bit_counts(e, m):
    with pytest.raises(ValueError, match="must be an integer in"):
        Format("bad", e, m)


def test_bias_outside_float32_range():
    with pytest.raises(ValueError, match="outside float32's -126..127"):
        Format("bad", 8, 7, bias=100)


def test_a_custom_format_with_its_own_bias_round_trips_through_policy_strings():
    fmt = mp.Format("e4m3b", 4, 3, has_inf=False, bias=8)
    policy = mp.Policy(params=fmt, compute=fmt, master="fp32", rules=(mp.Rule("head", fmt, fmt),))
    again = mp.Policy.parse(str(policy))
    assert again == policy and again.params.bias == 8 and again.params.max == fmt.max
    assert mp.Format.parse(fmt.spec) == fmt and mp.Format.parse("e5m2_bias15") == mp.E5M2
    assert mp.Format.parse("e3m2_bias-1").bias == -1
