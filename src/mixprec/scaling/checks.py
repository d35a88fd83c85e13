"""The checks on a loss scaler's numbers: a scale float32 can hold, and a DynamicScaler's options.

A loss scale lives in a float32 tensor: it must be stored there as a finite, normal number, so that S
and 1/S (at most 2^126) are both finite and nonzero. 1e-45 would be stored as 0.0 and 1e39 as inf.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SMALLEST_SCALE", "LARGEST_SCALE", "SCALE_RANGE", "check_loss_scale", "validate_dynamic"]

SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # 2^-126
LARGEST_SCALE = torch.finfo(torch.float32).max
SCALE_RANGE = f"[2^-126 ({SMALLEST_SCALE:.3g}), {LARGEST_SCALE:.3g}]"


def check_loss_scale(name: str, value: Any) -> float:
    """Return ``value`` as the float32 a scaler stores; ValueError unless that is finite, normal and > 0.

    The check is on the stored value: ``1e-45`` is stored as 0.0 and ``1e39`` as inf, both refused.

    Example:
        >>> check_loss_scale("scale", 2**16)
        65536.0
        >>> check_loss_scale("scale", 1e-45)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: scale must be a finite number > 0 that float32 stores as a normal number, ...
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number > 0 (a Python int or float), got {value!r}")
    try:
        stored = float(torch.tensor(float(value), dtype=torch.float32))
    except OverflowError:  # an int beyond float64
        stored = math.inf
    if not SMALLEST_SCALE <= stored <= LARGEST_SCALE:
        as_stored = "" if stored == value or math.isnan(stored) else f", which float32 stores as {stored!r}"
        raise ValueError(
            f"{name} must be a finite number > 0 that float32 stores as a normal number, i.e. in "
            f"{SCALE_RANGE}; got {value!r}{as_stored}. Loss scales are usually powers of two, e.g. 2**16")
    return stored


def validate_dynamic(init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any,
                      hysteresis: Any, min_scale: Any, max_scale: Any) -> None:
    init_scale = check_loss_scale("init_scale", init_scale)
    if not isinstance(growth_factor, (int, float)) or not (1 < growth_factor < math.inf):
        raise ValueError(f"growth_factor must be a finite number > 1 (e.g. 2.0), got {growth_factor!r}")
    if not isinstance(backoff_factor, (int, float)) or not (0 < backoff_factor < 1):
        raise ValueError(f"backoff_factor must be in (0, 1) (e.g. 0.5), got {backoff_factor!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be an integer >= 1 (e.g. 2000), got {growth_interval!r}")
    if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
        raise ValueError(f"hysteresis must be an integer >= 1 (1 backs off on every overflow), got {hysteresis!r}")
    check_loss_scale("min_scale", min_scale)  # > 0: a scale of 0 would make 1/scale inf
    if not isinstance(max_scale, (int, float)) or math.isnan(max_scale) or max_scale <= 0:
        raise ValueError(f"max_scale must be a number > 0 (inf: no ceiling), got {max_scale!r}")
    if min_scale > max_scale:
        raise ValueError(f"min_scale ({min_scale!r}) must be <= max_scale ({max_scale!r})")
    if not min_scale <= init_scale <= max_scale:
        raise ValueError(
            f"init_scale ({init_scale!r}) must lie in [min_scale, max_scale] = [{min_scale!r}, {max_scale!r}]")
