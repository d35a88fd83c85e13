"""Reading a comparison: each policy against the FP32 reference, and numbers formatted to read.

A policy *matches* when its mean final metric is within the reference's spread over seeds (at least
2% of the reference's gain from its initial metric, so one-seed runs have a tolerance). It *stalled*
when it got less than half of the reference's gain, and *diverged* when its metric is not finite.

Example:
    >>> format_scale(65536.0), format_bytes(1536), format_bytes(3_500_000)
    ('2^16', '1.5K', '3.34M')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mixprec.harness.training import Comparison

STALLED_BELOW = 0.5  # share of the reference's gain under which a run "stalled"
MIN_TOLERANCE = 0.02  # of the reference's gain: the tolerance when seeds agree exactly (or one seed)


@dataclass(frozen=True)
class Verdict:
    word: str  # "reference" | "matches" | "stalled" | "diverged" | "better" | "worse"
    gain: float  # share of the reference's improvement over the initial metric this policy achieved
    within_range: bool  # mean inside the reference's [min, max] over seeds (the strict check)
    tolerance: float

    def text(self, reference: str = "the reference") -> str:
        """The verdict in words, e.g. "stalled: 0% of f32's gain"."""
        if self.word == "stalled":
            return f"stalled: {max(self.gain, 0.0):.0%} of {reference}'s gain"
        return {"reference": "reference", "matches": f"matches {reference}", "diverged": "diverged",
                "better": f"better than {reference}", "worse": f"worse than {reference}"}[self.word]


def reference_policy(comparison: Comparison) -> str:
    """The policy others are measured against: f32 when present, else the first."""
    return "f32" if "f32" in comparison.policies else comparison.policies[0]


def verdicts(comparison: Comparison) -> dict[str, Verdict]:
    ref = comparison.summary(reference_policy(comparison))
    initial = ref["initial_metric"]
    ref_gain = initial - ref["mean"]
    spread = max(ref["max"] - ref["min"], 2 * ref["std"])
    tolerance = max(spread, MIN_TOLERANCE * abs(ref_gain))
    result = {}
    for policy in comparison.policies:
        s = comparison.summary(policy)
        gain = (initial - s["mean"]) / ref_gain if ref_gain else math.nan
        within = ref["min"] <= s["mean"] <= ref["max"]
        if policy == ref["policy"]:
            word = "reference"
        elif not math.isfinite(s["mean"]):
            word = "diverged"
        elif gain < STALLED_BELOW:
            word = "stalled"
        elif abs(s["mean"] - ref["mean"]) <= tolerance:
            word = "matches"
        else:
            better = s["mean"] > ref["mean"] if comparison.higher_is_better else s["mean"] < ref["mean"]
            word = "better" if better else "worse"
        result[policy] = Verdict(word, gain, within, tolerance)
    return result


def summarize(comparison: Comparison) -> list[dict[str, Any]]:
    """Per policy: the comparison's summary plus the verdict, ready for tables and JSON."""
    found = verdicts(comparison)
    reference = reference_policy(comparison)
    rows = []
    for policy in comparison.policies:
        row = comparison.summary(policy)
        v = found[policy]
        categories = [n for key, n in row["memory"].items() if key != "peak (measured)"]  # the peak is no category
        row.update(verdict=v.word, verdict_text=v.text(reference), gain=v.gain, within_reference_range=v.within_range,
                   tolerance=v.tolerance, memory_total=sum(categories))
        rows.append(row)
    return rows


# ----- formatting -------------------------------------------------------------------------------------


def format_metric(mean: float, std: float, n: int, compact: bool = False) -> str:
    """'0.9749 ± 0.0031' with the spread over seeds (``compact``: '0.9749±0.0031'), or just the mean
    for one seed."""
    if not math.isfinite(mean):
        return "nan"
    digits = 4 if abs(mean) < 10 else 2
    plus_minus = "±" if compact else " ± "
    return f"{mean:.{digits}f}" + (f"{plus_minus}{std:.{digits}f}" if n > 1 else "")


def format_scale(scale: float) -> str:
    """Loss scales are powers of two: '2^16'; anything else in %g."""
    if not math.isfinite(scale) or scale <= 0:
        return f"{scale:g}"
    mantissa, exponent = math.frexp(scale)
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{scale:g}"


def format_bytes(n: float) -> str:
    """Binary units, 3 significant figures at most: '512B', '1.5K', '3.3M', '1.2G'."""
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
