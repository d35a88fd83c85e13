"""The master-weight modes a param group can take, and the format a parameter's values are on.

A new mode (compact, kahan, stochastic: planned) is named here and gets its own file beside ``fp32.py``
and ``direct.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import FORMATS, Format

__all__ = ["MODES", "check_mode", "native_format"]

MODES = ("fp32", "none")
_PLANNED_MODES = ("compact", "kahan", "stochastic")


def native_format(dtype: torch.dtype) -> Format | None:
    """The named format a torch dtype stores (float16 -> F16, bfloat16 -> BF16, ...), or None."""
    for fmt in FORMATS.values():
        if fmt.torch_dtype == dtype:
            return fmt
    return None


def check_mode(mode: Any, where: str) -> str:
    """`mode` if it is one of `MODES`, else a ValueError naming `where` and the valid modes."""
    if mode not in MODES:
        planned = ""
        if mode in _PLANNED_MODES:
            planned = f" ({', '.join(_PLANNED_MODES)} are planned, not built yet)"
        raise ValueError(f"{where} must be one of {list(MODES)}, got {mode!r}{planned}")
    return str(mode)
