"""Seeing a model's numbers: `watch` (per-module ranges against every format, and a prepared FP8 model's
casts), `doctor` (a policy recommendation with its evidence, an FP8 one too) and `trace_nonfinite` (the
first op that went non-finite)."""

from .doctor import Diagnosis, ScaleRange, doctor
from .fp8_advice import Fp8Verdict
from .fp8_casts import Fp8Stats, Fp8Survey
from .trace import Trace, trace_nonfinite
from .watch import EXPONENTS, KINDS, TensorStats, Watch, watch

__all__ = ["watch", "Watch", "TensorStats", "KINDS", "EXPONENTS", "doctor", "Diagnosis", "ScaleRange",
           "trace_nonfinite", "Trace", "Fp8Stats", "Fp8Survey", "Fp8Verdict"]
