"""Seeing a model's numbers: `watch` (per-module ranges against every format), `doctor` (a policy
recommendation with its evidence) and `trace_nonfinite` (the first op that went non-finite)."""

from .doctor import Diagnosis, ScaleRange, doctor
from .trace import Trace, trace_nonfinite
from .watch import EXPONENTS, KINDS, TensorStats, Watch, watch

__all__ = ["watch", "Watch", "TensorStats", "KINDS", "EXPONENTS", "doctor", "Diagnosis", "ScaleRange",
           "trace_nonfinite", "Trace"]
