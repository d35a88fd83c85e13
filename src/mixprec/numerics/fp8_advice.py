"""The doctor's FP8 advice: which Linear layers are safe in FP8, under which scaling, as a policy string.

From an `Fp8Survey` of the FP32 steps (every cast a step of FP8 matmuls would make, under each of
`SURVEYED`'s granularities), per Linear layer and granularity:

* **safe** means: in every cast of the layer's input and weight (onto E4M3) and of its output gradient
  (onto E5M2), nothing saturated, nothing was non-finite, and at most `lost` (the doctor's 0.1%) of the
  non-zero values flushed to zero (the same share the doctor lets a loss scale lose in FP16);
* the layers considered are those mixprec's FP8 policies give FP8 matmuls by default (`explain()`): not
  the first and last Linear layers, nor those whose dims are not multiples of 16, nor Linear subclasses
  with their own forward. They stay in BF16 and the table says why;
* the granularity chosen is the one under which the most of those layers are safe, the coarsest of them
  on a tie (`SURVEYED` is ordered coarsest first: fewer scales, and tensorwise and rowwise run natively
  on FP8 tensor cores); the policy is its preset ``fp8-<granularity>`` (bf16-master with FP8 matmuls),
  with a rule ``name:<layer>:bf16`` for each considered layer not safe under it;
* no policy when no layer is safe under any granularity (or none is considered).

Delayed scaling is not surveyed apart: its scales are tensorwise ones from past amaxes, as safe as
tensorwise while the amaxes do not grow, and saturating where they do (see `Watch.fp8_saturated` on a
prepared run). The survey casts the FP32 values; a prepared model casts their BF16 roundings, which can
move a value across a flush threshold by at most one BF16 rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..fp8.linear import ROLES
from ..policy import Policy
from .fp8_casts import SURVEYED, Fp8Stats

__all__ = ["Fp8Verdict", "recommend_fp8"]

_FORMATS = {"input": "E4M3", "weight": "E4M3", "grad": "E5M2"}


def _pct(share: float) -> str:
    return "0" if share == 0 else f"{100 * share:.3g}%"


@dataclass(frozen=True)
class Fp8Verdict:
    """One Linear layer in the doctor's FP8 table.

    Attributes:
        layer: its qualified name.
        default: ``""`` if mixprec's FP8 policies give it FP8 matmuls by default, else why not (e.g. ``"the
            first Linear layer"``).
        shares: granularity -> {"saturated", "flushed"}: the largest share over its operands (input,
            weight, output gradient), of their non-zero values.
        worst: granularity -> the operand with the largest flushed (or, if any, saturated) share.
        safe: granularity -> whether it is safe under it (see module doc).
        fp8: whether the recommended FP8 policy gives it FP8 matmuls.
    """

    layer: str
    default: str
    shares: dict[str, dict[str, float]]
    worst: dict[str, str]
    safe: dict[str, bool]
    fp8: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, granularity: str) -> str:
        """``"saturated / flushed"`` under `granularity`, and whether that is safe."""
        s = self.shares[granularity]
        return f"{_pct(s['saturated'])} / {_pct(s['flushed'])} {'safe' if self.safe[granularity] else 'unsafe'}"


def _verdict(layer: str, default: str, stats: dict[tuple[str, str, str], Fp8Stats], granularities: list[str],
             lost: float) -> Fp8Verdict:
    shares, worst, safe = {}, {}, {}
    for g in granularities:
        mine = [stats[layer, role, g] for role in ROLES if (layer, role, g) in stats]
        top = max(mine, key=lambda s: (s.share()["saturated"], s.share()["flushed"]))
        shares[g] = {k: max(s.share()[k] for s in mine) for k in ("saturated", "flushed")}
        worst[g] = top.role
        safe[g] = all(s.saturated == 0 and s.nonfinite == 0 and s.share()["flushed"] <= lost for s in mine)
    return Fp8Verdict(layer, default, shares, worst, safe)


def _defaults(model: torch.nn.Module) -> dict[str, str]:
    """Linear layer name -> "" if the FP8 presets make it FP8, else why not (from explain()'s reasons)."""
    modules = dict(model.named_modules())
    found = {}
    for mp in Policy.parse("fp8-tensorwise").module_precisions(model, warn=False):
        if isinstance(modules[mp.name], torch.nn.Linear):
            why = mp.reason.partition("not fp8: ")[2] or "it computes in FP32"
            found[mp.name] = "" if mp.fp8 else why
    return found


def _rule(layer: str) -> str | None:
    """A rule keeping exactly `layer` in BF16 (its name as a glob, special characters escaped), or None
    when its name cannot be written in a policy string (a ',' or '=' in it)."""
    if any(c in layer for c in ",="):
        return None
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in layer)
    return f"rule=name:{escaped}:bf16"


def recommend_fp8(model: torch.nn.Module, stats: dict[tuple[str, str, str], Fp8Stats], lost: float
                  ) -> tuple[str | None, list[str], list[Fp8Verdict]]:
    """The FP8 policy to use (or None), the evidence, and the per-layer table, from a survey's `stats`.

    Example:
        >>> from mixprec.numerics.fp8_casts import Fp8Survey
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])
        >>> with Fp8Survey(model) as survey:
        ...     model(torch.randn(8, 32)).sum().backward()
        >>> policy, evidence, table = recommend_fp8(model, survey.stats(), 0.001)
        >>> policy, [(v.layer, v.fp8) for v in table]
        ('fp8-tensorwise', [('0', False), ('1', True), ('2', False)])
    """
    granularities = [g for g in SURVEYED if any(k[2] == g for k in stats)]
    layers = list(dict.fromkeys(k[0] for k in stats))
    defaults = _defaults(model)
    verdicts = [_verdict(n, defaults.get(n, "not a layer mixprec makes FP8"), stats, granularities, lost)
                for n in layers]
    considered = [v for v in verdicts if not v.default]
    kept = [f"{v.layer} ({v.default})" for v in verdicts if v.default]
    evidence = [f"FP8: a layer is safe when in every cast a step makes (input and weight onto E4M3, output "
                f"gradient onto E5M2) nothing saturates and at most {100 * lost:g}% of the non-zero values flush "
                f"to zero"]
    if kept:
        evidence.append(f"staying in BF16 as mixprec's FP8 policies keep them: {', '.join(kept)}")
    if not considered:
        evidence.append("FP8 not recommended: no Linear layer that ran would get FP8 matmuls")
        return None, evidence, verdicts
    safe = {g: [v.layer for v in considered if v.safe[g]] for g in granularities}
    evidence.append("layers safe per scaling: " + ", ".join(f"{g} {len(safe[g])} of {len(considered)}"
                                                            for g in granularities))
    best = max(granularities, key=lambda g: len(safe[g]))  # the first (coarsest) of the most
    if not safe[best]:
        evidence.append("FP8 not recommended: no layer is safe under any scaling; "
                        + "; ".join(_why(v, best) for v in considered[:4]))
        return None, evidence, verdicts
    unsafe = [v for v in considered if not v.safe[best]]
    rules = [_rule(v.layer) for v in unsafe]
    if any(r is None for r in rules):
        evidence.append("FP8 not recommended: an unsafe layer's name cannot be written in a rule")
        return None, evidence, verdicts
    policy = ",".join([f"fp8-{best}", *(r for r in rules if r)])
    chosen = {mp.name for mp in Policy.parse(policy).module_precisions(model, warn=False) if mp.fp8}
    verdicts = [Fp8Verdict(v.layer, v.default, v.shares, v.worst, v.safe, v.layer in chosen) for v in verdicts]
    evidence.append(f"{best} scales: {len(safe[best])} of {len(considered)} layers in FP8 "
                    f"({', '.join(safe[best][:8])}{', ...' if len(safe[best]) > 8 else ''})")
    if unsafe:
        evidence.append("kept in BF16 by a rule: " + "; ".join(_why(v, best) for v in unsafe))
    evidence.append("delayed scaling (fp8-delayed) uses tensorwise scales from past amaxes: it saturates where "
                    "the amax grows; watch a prepared run to see it (Watch.fp8_saturated)")
    return policy, evidence, verdicts


def _why(v: Fp8Verdict, granularity: str) -> str:
    s, role = v.shares[granularity], v.worst[granularity]
    what = (f"saturates {_pct(s['saturated'])}" if s["saturated"] else f"flushes {_pct(s['flushed'])}")
    return f"{v.layer} ({granularity} {what} of its {role} in {_FORMATS[role]})"

