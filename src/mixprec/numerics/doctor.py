"""The numerics doctor: a few FP32 steps under `watch`, then per format what would be lost, the loss
scales that bring the gradients into range, the modules that must stay wider, and a policy to use.

    diagnosis = mp.doctor(model, batches, loss_fn)      # loss_fn(model, batch) -> loss
    print(diagnosis)                                     # the findings, with their evidence
    diagnosis.policy                                     # e.g. "f16-master,scaling=dynamic:1024"

How the recommendation is made (all from the watched FP32 values; a format's thresholds are those of
round-to-nearest onto it):

* Loss scale range, per narrow-range format (FP16, FP8): gradients (activation and weight gradients
  together, as loss scaling multiplies both) scaled by 2^k must not overflow: ``k <= k_max`` with
  ``amax * 2^k`` below the overflow threshold; and at most `LOST` (0.1%, the paper's "all but 0.1%")
  of the non-zero gradient values may flush to zero: ``k >= k_min``. A dynamic scaler starts at
  ``2^clamp(16, k_min, k_max)`` (torch.amp's 2^16 unless the range says otherwise).
* Every share reported is of the *non-zero* values of a kind (an exact zero is exact in every format,
  so it is never lost): the table of shares lost per format, the share of gradients flushed unscaled
  (counted exactly, from the watch's round-to-nearest counts) and the summary that quotes them.
* Modules that must stay wider: those whose activations or weights overflow the format even before
  any scaling (the innermost ones: a parent whose output is its child's is not named again).
* FP16 is recommended when a loss scale range exists and at most `MAX_RULES` modules need an FP32
  rule; otherwise BF16, whose range is FP32's (`Diagnosis.policy`).
* FP8 matmuls, recommended apart (`Diagnosis.fp8_policy`): during the same steps every Linear layer's
  input, weight and output gradient are cast as FP8 layers would cast them, under each granularity
  (`fp8_casts.Fp8Survey`); a layer is safe when nothing saturates and at most `lost` of the non-zero
  values flush to zero, and the policy is the preset of the coarsest granularity under which the most
  layers are safe, with a BF16 rule for each layer that is not (`fp8_advice.recommend_fp8`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..formats import BF16, F16, FORMATS, Format
from .fp8_advice import Fp8Verdict, recommend_fp8
from .fp8_casts import Fp8Stats, Fp8Survey
from .watch import EXPONENTS, KINDS, TensorStats, _Thresholds, watch

__all__ = ["doctor", "Diagnosis", "LOST", "MAX_RULES"]

LOST = 0.001  # the share of non-zero gradient values a loss scale may let flush to zero
MAX_RULES = 3  # more modules than this overflowing FP16 in forward: recommend BF16 instead of FP32 rules
_GRADIENTS = ("activation_grad", "weight_grad")
_FORWARD = ("activation", "weight")


@dataclass(frozen=True)
class ScaleRange:
    """Loss scales 2^k_min .. 2^k_max that bring the gradients into a format's range (see module doc)."""

    k_min: int
    k_max: int
    lost_unscaled: float  # share of non-zero gradient values flushed to zero at scale 1 (exact where counted)
    lost_at_min: float  # at most this share is flushed at 2^k_min (values in the binade below the smallest
    # subnormal count as lost: the histogram cannot tell which of them round up)

    @property
    def empty(self) -> bool:
        return self.k_min > self.k_max

    @property
    def initial(self) -> int:
        """The exponent a dynamic scaler should start from: 16 (2^16) clamped into the range."""
        return min(max(16, self.k_min), self.k_max)


@dataclass
class Diagnosis:
    """What `doctor` found. ``str(diagnosis)`` is a readable report; `to_dict` is JSON-ready.

    Attributes:
        policy: the recommended policy string (parses with `mp.Policy.parse`).
        evidence: one line per reason behind it.
        shares: format name -> kind -> {"overflow", "subnormal", "underflow"}: shares of the kind's
            non-zero values (finite, not exactly zero; the same count the summary quotes).
        scale_ranges: format name -> `ScaleRange` (narrow-range formats only).
        wider: format name -> module names whose activations or weights overflow it (innermost).
        totals: kind -> `TensorStats` over the whole model; modules: (module, kind) -> `TensorStats`.
        steps: how many batches were watched.
        fp8_policy: the recommended FP8 policy string (parses with `mp.Policy.parse`), or None.
        fp8_evidence: the reasons for it (or against FP8).
        fp8_layers: per Linear layer that ran, an `Fp8Verdict`: its worst saturated and flushed shares per
            granularity, whether it is safe, and whether `fp8_policy` runs it in FP8.
        fp8_stats: (layer, role, granularity) -> `Fp8Stats` of the casts the survey made.
    """

    policy: str
    evidence: list[str]
    shares: dict[str, dict[str, dict[str, float]]]
    scale_ranges: dict[str, ScaleRange]
    wider: dict[str, list[str]]
    totals: dict[str, TensorStats] = field(repr=False)
    modules: dict[tuple[str, str], TensorStats] = field(repr=False)
    steps: int = 0
    fp8_policy: str | None = None
    fp8_evidence: list[str] = field(default_factory=list)
    fp8_layers: list[Fp8Verdict] = field(default_factory=list)
    fp8_stats: dict[tuple[str, str, str], Fp8Stats] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "evidence": self.evidence, "steps": self.steps, "shares": self.shares,
            "scale_ranges": {name: {"k_min": r.k_min, "k_max": r.k_max, "initial": r.initial, "empty": r.empty,
                                    "lost_unscaled": r.lost_unscaled, "lost_at_min": r.lost_at_min}
                             for name, r in self.scale_ranges.items()},
            "wider": self.wider,
            "totals": {kind: _stats_dict(s) for kind, s in self.totals.items()},
            "modules": [{"module": m, "kind": k, **_stats_dict(s)} for (m, k), s in self.modules.items()],
            "fp8_policy": self.fp8_policy, "fp8_evidence": self.fp8_evidence,
            "fp8_layers": [v.to_dict() for v in self.fp8_layers],
            "fp8_stats": [s.to_dict() for s in self.fp8_stats.values()],
        }

    def __str__(self) -> str:
        lines = [f"recommended policy: {self.policy}", "", "why:"]
        lines += [f"  - {e}" for e in self.evidence]
        lines += ["", "share of non-zero values lost per format (overflow / subnormal / underflow to zero):"]
        for name, kinds in self.shares.items():
            cells = [f"{kind} {_pct(s['overflow'])}/{_pct(s['subnormal'])}/{_pct(s['underflow'])}"
                     for kind, s in kinds.items()]
            lines.append(f"  {name:6s} " + "  ".join(cells))
        return "\n".join(lines + self._fp8_lines())

    def _fp8_lines(self) -> list[str]:
        if not self.fp8_layers and not self.fp8_evidence:
            return []
        lines = ["", f"recommended FP8 policy: {self.fp8_policy or 'none'}", "", "why:"]
        lines += [f"  - {e}" for e in self.fp8_evidence]
        if self.fp8_layers:
            granularities = list(self.fp8_layers[0].shares)
            width = max(5, *(len(v.layer) for v in self.fp8_layers))
            cells = {v.layer: [v.cell(g) for g in granularities] for v in self.fp8_layers}
            widths = [max(len(g), *(len(c[i]) for c in cells.values())) for i, g in enumerate(granularities)]
            header = [f"{'layer':{width}s}", "fp8", *(f"{g:{w}s}" for g, w in zip(granularities, widths, strict=True))]
            lines += ["", "FP8 per Linear layer (saturated / flushed: the worst operand's share of its non-zero "
                      "values):", ("  " + "  ".join(header)).rstrip()]
            for v in self.fp8_layers:
                row = [f"{v.layer:{width}s}", "yes" if v.fp8 else "no ",
                       *(f"{c:{w}s}" for c, w in zip(cells[v.layer], widths, strict=True))]
                lines.append(("  " + "  ".join(row) + (f"  ({v.default})" if v.default else "")).rstrip())
        return lines


def _pct(share: float) -> str:
    return "0" if share == 0 else f"{100 * share:.3g}%"


def nonzero_shares(stats: TensorStats, fmt: Format) -> dict[str, float]:
    """The share of `stats`' non-zero values that would overflow, be subnormal, or flush to zero in `fmt`.

    Example:
        >>> import torch, mixprec as mp
        >>> with mp.watch(torch.nn.Identity()) as w:
        ...     _ = w.model(torch.tensor([0.0, 1e5, 1.0, 1e-6, 1e-9]))
        >>> nonzero_shares(w.stats()["", "activation"], mp.F16)
        {'overflow': 0.25, 'subnormal': 0.25, 'underflow': 0.25}
    """
    counts = stats.formats[fmt.name]
    return {k: (v / stats.nonzero if stats.nonzero else 0.0) for k, v in counts.items()}


def _stats_dict(s: TensorStats) -> dict[str, Any]:
    nonzero = np.flatnonzero(s.histogram)
    return {"count": s.count, "zeros": s.zeros, "nonfinite": s.nonfinite, "amax": s.amax,
            "formats": s.formats,
            "histogram": {int(EXPONENTS[i]): int(s.histogram[i]) for i in nonzero}}


def scale_range(gradients: TensorStats, fmt: Format, lost: float = LOST) -> ScaleRange:
    """The loss scale exponents that keep `gradients` (FP32 values) inside `fmt` (see module doc).

    Example:
        >>> import numpy as np
        >>> from mixprec.numerics.watch import EXPONENTS
        >>> hist = np.zeros(len(EXPONENTS), dtype=np.int64); hist[EXPONENTS == -27] = 1000
        >>> r = scale_range(TensorStats(1000, 0, 0, 2.0**-26.5, hist), F16)
        >>> r.k_min, r.k_max   # 2^-27 * 2^3 = 2^-24: FP16's smallest subnormal; 2^-26.5 * 2^42 < 65520
        (3, 42)
    """
    t = _Thresholds.of(fmt)
    k_max = 200 if gradients.amax == 0 else math.floor(math.log2(t.overflow_from / gradients.amax))
    if gradients.amax and gradients.amax * 2.0**k_max >= t.overflow_from:  # log2 rounding at the edge
        k_max -= 1
    nonzero = gradients.nonzero
    # A value with exponent e (2^e <= |x| < 2^(e+1)) surely survives scaling by 2^k when 2^(e+k) is above
    # half the smallest subnormal; values in the binade just below may round either way: counted lost.
    survive_from = math.log2(fmt.min_subnormal)  # e + k >= this: |x| * 2^k >= min_subnormal

    def lost_share(k: int) -> float:
        if not nonzero:
            return 0.0
        return float(gradients.histogram[EXPONENTS + k < survive_from].sum()) / nonzero

    k_min = next((k for k in range(-64, 201) if lost_share(k) <= lost), 201)
    counted = gradients.formats.get(fmt.name)  # the watch's exact count of values rounding to zero
    unscaled = counted["underflow"] / nonzero if counted and nonzero else lost_share(0)
    return ScaleRange(k_min, k_max, unscaled, lost_share(k_min))


def _innermost(names: list[str]) -> list[str]:
    """Drop a module whose descendant is also named (the child is where the values came from)."""
    return [n for n in names if not any(o != n and (n == "" or o.startswith(n + ".")) for o in names)]


def doctor(model: torch.nn.Module, batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None, formats: Iterable[Format | str] | None = None,
           lost: float = LOST, fp8: bool = True) -> Diagnosis:
    """Run each batch in FP32 under `watch` and recommend a policy for `model` (see module doc).

    Args:
        model: the model, as you would train it (not prepared: the doctor measures its FP32 values).
        batches: a few batches (each passed to `loss_fn` as is).
        loss_fn: ``loss_fn(model, batch) -> loss`` (a scalar); it may compute the loss inside forward.
        optimizer: if given, ``optimizer.step()`` follows each backward (the doctor then sees a few
            training steps; your model's weights change). Without it the weights are left as they are.
        formats: formats to report on; default every named format (`mp.FORMATS`).
        lost: the share of non-zero gradient values a loss scale may flush to zero (default 0.1%); also
            the share of an FP8 operand's non-zero values that may flush for its layer to be safe in FP8.
        fp8: survey the FP8 casts of the Linear layers and recommend an FP8 policy (`fp8_policy`).

    Gradients are cleared (set to None) at the end. Syncs: yes (the loss check per batch, one read of
    the statistics at the end).

    Example:
        >>> import torch, mixprec as mp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        >>> d = mp.doctor(model, batches, lambda m, x: m(x).pow(2).mean() * 2.0**-20)
        >>> d.policy
        'f16-master,scaling=dynamic:65536'
    """
    chosen = list(FORMATS.values()) if formats is None else [Format.parse(f) for f in formats]
    chosen = list(dict.fromkeys([*chosen, F16, BF16]))  # the recommendation needs these two
    steps = 0
    with watch(model, chosen) as w, Fp8Survey(model) if fp8 else contextlib.nullcontext() as survey:
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss).all():
                raise ValueError(f"the FP32 loss of batch {steps} is {loss.detach().cpu().tolist()}: the model does "
                                 f"not train in FP32 either; fix that first (the doctor compares formats to FP32)")
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
        modules = w.stats()
        fp8_stats = survey.stats() if survey is not None else {}
    model.zero_grad(set_to_none=True)
    if not steps:
        raise ValueError("doctor got no batches: pass a few (e.g. a list of 3 batches) to watch")

    totals: dict[str, TensorStats] = {}
    for (_, kind), s in modules.items():
        totals[kind] = totals[kind].merge(s) if kind in totals else s
    shares = {f.name: {k: nonzero_shares(totals[k], f) for k in KINDS if k in totals} for f in chosen}
    grads = [totals[k] for k in _GRADIENTS if k in totals]
    gradients = grads[0].merge(grads[1]) if len(grads) == 2 else grads[0] if grads else None
    narrow = [f for f in chosen if f.exponent_bits < 8]
    ranges = {f.name: scale_range(gradients, f, lost) for f in narrow} if gradients is not None else {}
    wider = {f.name: _innermost(sorted({m for (m, k), s in modules.items()
                                        if k in _FORWARD and s.formats[f.name]["overflow"]}))
             for f in chosen}
    policy, evidence = _recommend(ranges.get(F16.name), wider[F16.name], totals, shares[F16.name], lost)
    fp8_policy, fp8_evidence, fp8_layers = recommend_fp8(model, fp8_stats, lost) if fp8 else (None, [], [])
    return Diagnosis(policy, evidence, shares, ranges, wider, totals, modules, steps, fp8_policy, fp8_evidence,
                     fp8_layers, fp8_stats)


def _recommend(fp16: ScaleRange | None, overflowing: list[str], totals: dict[str, TensorStats],
               fp16_shares: dict[str, dict[str, float]], lost: float) -> tuple[str, list[str]]:
    evidence = []
    amax = {k: s.amax for k, s in totals.items()}
    if "activation" in amax:
        evidence.append(f"largest activation {amax['activation']:.4g}, largest weight {amax.get('weight', 0):.4g} "
                        f"(FP16 max {F16.max:g})")
    if fp16 is not None:
        kinds = ", ".join(f"{k.replace('_grad', '')} gradients {_pct(fp16_shares[k]['underflow'])}"
                          for k in _GRADIENTS if k in fp16_shares)
        evidence.append(
            f"gradients: {_pct(fp16.lost_unscaled)} of the non-zero gradient values flush to zero in FP16 unscaled "
            f"({kinds}: the FP16 underflow shares in the table); loss scales 2^{fp16.k_min}..2^{fp16.k_max} flush "
            f"at most {100 * lost:g}% and overflow nothing" + (" (none: the range is empty)" if fp16.empty else ""))
    if overflowing:
        evidence.append(f"FP16 overflows in the forward of {len(overflowing)} module(s): {', '.join(overflowing[:8])}")
    if fp16 is None or fp16.empty or len(overflowing) > MAX_RULES or "" in overflowing:
        why = ("no loss scale fits FP16's range" if fp16 is None or fp16.empty else
               f"{len(overflowing)} modules would need FP32 rules" if overflowing else "")
        evidence.append(f"BF16 has FP32's range: {why}; bf16-master keeps FP32 master weights")
        return "bf16-master", evidence
    policy = f"f16-master,scaling=dynamic:{2 ** fp16.initial}"
    policy += "".join(f",rule={name}:fp32" for name in overflowing)
    if overflowing:
        evidence.append("those modules compute and store their weights in FP32 (rules); the rest in FP16")
    evidence.append(f"dynamic loss scaling starting at 2^{fp16.initial}: inside the range, backing off on overflow")
    return policy, evidence
