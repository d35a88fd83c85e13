"""Reading a comparison: each policy against the FP32 reference, and numbers formatted to read.

A policy *matches* when its mean final metric is within the reference's spread over seeds (at least
2% of the reference's gain from its initial metric, so one-seed runs have a tolerance). It *stalled*
when it got less than half of the reference's gain, and *diverged* when its metric is not finite.

Long policy strings are shown as their shortest equivalent: a preset and the keys that differ from it
(`short_policy`), which parses back to the same policy, broken at commas where a column is narrow.

Example:
    >>> format_scale(65536.0), format_bytes(1536), format_bytes(3_500_000)
    ('2^16', '1.5K', '3.34M')
    >>> short_policy("params=fp16,compute=fp16,output=fp32,master=fp32,reduce=fp32,scaling=dynamic:4096,execution=auto")
    'f16-master,scaling=dynamic:4096'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mixprec as mp
from mixprec.harness.training import Comparison

STALLED_BELOW = 0.5  # share of the reference's gain under which a run "stalled"
MIN_TOLERANCE = 0.02  # of the reference's gain: the tolerance when seeds agree exactly (or one seed)


@dataclass(frozen=True)
class Verdict:
    word: str  # "reference" | "matches" | "stalled" | "diverged" | "better" | "worse"
    gain: float  # share of the reference's improvement over the initial metric this policy achieved
    within_range: bool  # mean inside the reference's [min, max] over seeds (the strict check)
    tolerance: float  # how far from the reference's mean "matches" reaches
    difference: float = math.nan  # this policy's mean minus the reference's
    basis: str = ""  # what the tolerance is: "spread" (the reference's over seeds) or "gain" (2% of its gain)

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
    basis = "spread" if spread >= MIN_TOLERANCE * abs(ref_gain) else "gain"
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
        result[policy] = Verdict(word, gain, within, tolerance, s["mean"] - ref["mean"], basis)
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
                   tolerance=v.tolerance, tolerance_basis=v.basis, difference=v.difference,
                   memory_total=sum(categories))
        rows.append(row)
    return rows


def verdict_sentence(row: dict[str, Any], ref: dict[str, Any]) -> str:
    """A verdict with the numbers it was decided on, e.g. "matches f32: mean 0.0175 vs f32's 0.0173,
    0.000167 apart, within the tolerance of 0.00629 (2% of f32's gain; f32's seeds span 0.01732–0.01734)".

    ``row`` and ``ref`` are rows of `summarize` (the policy's and the reference's). The sentence states
    the test the verdict word passed (distance to the reference's mean against the tolerance), so it
    never says "matches" beside a number that reads as not matching.
    """
    name = ref["policy"]
    word, mean, tol = row["verdict"], row["mean"], row["tolerance"]
    span = f"; {name}'s seeds span {ref['min']:.4g}–{ref['max']:.4g}" if len(ref["final_metric"]) > 1 else ""
    basis = f"2% of {name}'s gain" if row.get("tolerance_basis") == "gain" else f"{name}'s spread over seeds"
    if word == "reference":
        return f"reference: mean {mean:.4g}{span}"
    if word == "diverged":
        finals = row["final_metric"]
        lost = sum(not math.isfinite(v) for v in finals)
        return f"diverged: the final metric is not finite in {lost} of {len(finals)} seed(s)"
    if word == "stalled":
        return (f"{row['verdict_text']} (mean {mean:.4g} vs {name}'s {ref['mean']:.4g}, from "
                f"{row['initial_metric']:.4g} at the start; under {STALLED_BELOW:.0%} of the gain is stalled)")
    apart = f"mean {mean:.4g} vs {name}'s {ref['mean']:.4g}, {abs(row['difference']):.3g} apart"
    relation = "within" if word == "matches" else "beyond"
    return f"{row['verdict_text']}: {apart}, {relation} the tolerance of {tol:.3g} ({basis}{span})"


def short_policy(policy: str) -> str:
    """The shortest string naming the same policy: itself, or a preset with the keys that differ from it.

    A string that does not parse (a label, not a policy) is returned as it is.

    Example:
        >>> short_policy("f16-master"), short_policy("params=fp16,compute=fp16,output=fp32,master=fp32,"
        ...                                          "reduce=fp32,scaling=static:1024,execution=auto")
        ('f16-master', 'f16-master,scaling=static:1024')
    """
    try:
        target = mp.Policy.parse(policy)
    except (ValueError, TypeError):
        return policy
    parts = [p.strip() for p in policy.split(",") if p.strip()]
    best = policy
    for preset in mp.PRESETS:
        base = mp.Policy.parse(preset)
        changed = [p for p in parts if "=" in p and _parses_differently(preset, p, base)]
        candidate = ",".join([preset, *changed])
        if len(candidate) < len(best) and _parses_to(candidate, target):
            best = candidate
    return best


def _parses_differently(preset: str, part: str, base: Any) -> bool:
    try:
        return bool(mp.Policy.parse(f"{preset},{part}") != base)
    except ValueError:
        return True


def _parses_to(text: str, target: Any) -> bool:
    try:
        return bool(mp.Policy.parse(text) == target)
    except ValueError:
        return False


def wrap_policy(label: str, width: int) -> str:
    """``label`` broken into lines after its commas so that lines are at most ``width`` characters where
    a comma allows (a part longer than that keeps its own line).

    Example:
        >>> print(wrap_policy("f16-master,scaling=dynamic:16777216", 20))
        f16-master,
        scaling=dynamic:16777216
    """
    lines: list[str] = []
    for part in label.split(","):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "," + part
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return "\n".join(lines)


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
