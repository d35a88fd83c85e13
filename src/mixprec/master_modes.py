"""The names of the master-weight modes, what each keeps, and its bytes per parameter.

Below both `mixprec.policy` (a policy names a mode: ``master=compact``) and `mixprec.master` (which
implements them, one file per mode). See docs/loss-scaling-and-masters.md.
"""

from __future__ import annotations

from .formats import F32, Format

__all__ = ["MODES", "MASTER_MODES", "TRANSIENT_MODES", "DESCRIPTIONS", "master_bytes"]

#: Every mode; those with a master (an FP32 value the optimizer steps); those whose master is rebuilt per step.
MODES = ("fp32", "compact", "kahan", "stochastic", "none")
MASTER_MODES = MODES[:4]
TRANSIENT_MODES = MODES[1:4]

#: What each mode keeps, for errors and tables.
DESCRIPTIONS = {
    "fp32": "an FP32 master copy (the paper)",
    "compact": "the low 16 bits of the FP32 master beside a BF16 parameter: exactly FP32 masters",
    "kahan": "a 16-bit compensation buffer (Kahan summation of the updates)",
    "stochastic": "no copy; the update is rounded stochastically into the parameter",
    "none": "no copy; the update is rounded to nearest into the parameter (small updates are lost)",
}


def master_bytes(mode: str, fmt: Format | None) -> float:
    """Bytes per parameter a mode keeps beside a parameter on `fmt` (None or FP32: nothing)."""
    if fmt is None or fmt == F32 or mode in ("none", "stochastic"):
        return 0.0
    return {"fp32": 4.0, "compact": 2.0, "kahan": fmt.bits / 8}[mode]
