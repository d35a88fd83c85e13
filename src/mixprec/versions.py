"""The version check every mixprec state dict (scalers, MasterWeights) makes before it is loaded."""

from __future__ import annotations

from typing import Any

__all__ = ["check_version"]


def check_version(found: Any, expected: int, what: str) -> None:
    """Raise a ValueError unless `found` is the integer `expected` (a bool or a string "1" is not).

    Example:
        >>> check_version(1, 1, "scaler")
        >>> check_version("1", 1, "scaler")
        Traceback (most recent call last):
        ValueError: scaler state dict version must be the integer 1, got the str '1'
        >>> check_version(2, 1, "scaler")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: scaler state dict version 2 is not supported: this mixprec reads version 1 ...
    """
    if isinstance(found, bool) or not isinstance(found, int):
        raise ValueError(f"{what} state dict version must be the integer {expected}, "
                         f"got the {type(found).__name__} {found!r}")
    if found != expected:
        newer = " (it was written by a newer mixprec: load it with that one)" if found > expected else ""
        raise ValueError(f"{what} state dict version {found} is not supported: this mixprec reads version "
                         f"{expected}{newer}")
