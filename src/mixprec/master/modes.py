"""The master-weight modes a param group can take, and the format a parameter's values are on.

A mode is named here and has its own file beside ``fp32.py`` (``compact.py``, ``kahan.py``,
``stochastic.py``, kept by ``transient.py``; ``direct.py`` for "none").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..formats import F32, FORMATS, Format
from ..master_modes import DESCRIPTIONS, MASTER_MODES, MODES, TRANSIENT_MODES, master_bytes

__all__ = ["MODES", "MASTER_MODES", "TRANSIENT_MODES", "check_mode", "check_supported", "master_bytes",
           "native_format", "format_of", "parse_param_format"]


def native_format(dtype: torch.dtype) -> Format | None:
    """The named format a torch dtype stores (float16 -> F16, bfloat16 -> BF16, ...), or None."""
    for fmt in FORMATS.values():
        if fmt.torch_dtype == dtype:
            return fmt
    return None


def check_mode(mode: Any, where: str) -> str:
    """`mode` if it is one of `MODES`, else a ValueError naming `where` and the valid modes."""
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {list(MODES)}, got {mode!r}: "
                         + "; ".join(f"{m}: {d}" for m, d in DESCRIPTIONS.items()))
    return str(mode)


def check_supported(mode: str, fmt: Format, index: int) -> None:
    """A ValueError unless parameter `index`, on format `fmt`, can keep its master in `mode`."""
    if mode == "compact" and fmt.name != "bf16":
        raise ValueError(
            f"parameter {index} is {fmt.name}, but master mode 'compact' keeps the low 16 bits of an FP32 "
            f"master beside a BF16 parameter (which is the master's top 16 bits): it works for bf16 "
            f"parameters only. Use 'kahan' or 'stochastic' (or 'fp32') for {fmt.name} parameters")
    if mode == "kahan" and fmt.torch_dtype is None:
        raise ValueError(
            f"parameter {index} is {fmt.name}, but master mode 'kahan' keeps a compensation buffer in the "
            f"parameter's torch dtype, which {fmt.name} does not have: use 'stochastic' or 'fp32'")


def format_of(param: torch.Tensor, index: int, param_format: Format | None,
              formats_by_param: dict[int, Format] | None) -> tuple[Format | None, bool]:
    """(the format of `param`'s values, whether it is emulated in float32 storage), or a ValueError for
    parameter `index` (MasterWeights' `param_format` and per-parameter formats, see its docstring)."""
    native = native_format(param.dtype)
    if param.dtype == torch.float32:
        fmt = param_format
        if formats_by_param is not None:
            fmt = formats_by_param.get(id(param), F32)
        return (fmt, True) if fmt is not None and fmt != F32 else (None, False)
    if not param.is_floating_point():
        raise ValueError(
            f"parameter {index} has dtype {param.dtype}; MasterWeights needs floating-point parameters")
    if param_format is not None and native is not None and param_format != native:
        raise ValueError(
            f"parameter {index} is {param.dtype} but param_format is {param_format}: "
            f"param_format is for float32 parameters that emulate a narrower format; "
            f"leave it out for {param.dtype} parameters")
    return native, False


def parse_param_format(param_format: Format | str | Mapping[torch.Tensor, Format | str] | None
                       ) -> tuple[Format | None, dict[int, Format] | None]:
    """MasterWeights' `param_format` as (one format for every float32 parameter, or None; per-parameter
    formats by id, or None). A mapping gives per-parameter formats (e.g. an emulated model with FP32
    islands): float32 parameters absent from it are FP32."""
    if isinstance(param_format, Mapping):
        return None, {id(p): Format.parse(f) for p, f in param_format.items()}
    return (None if param_format is None else Format.parse(param_format)), None
