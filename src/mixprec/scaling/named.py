"""The scaler a policy's ``scaling`` text names: 'none', 'static:S', 'dynamic', 'dynamic:S0'."""

from __future__ import annotations

import torch

from .dynamic import DynamicScaler
from .scalers import LossScaler, NoScaler, StaticScaler

__all__ = ["parse_scaling", "make_scaler"]


def parse_scaling(text: str) -> str:
    """The canonical form of a policy's ``scaling`` text, so that equal choices compare equal; ValueError
    naming the valid forms otherwise.

    Example:
        >>> parse_scaling("static:1024.0"), parse_scaling(" Dynamic ")
        ('static:1024', 'dynamic')
    """
    if not isinstance(text, str):
        raise ValueError(f"scaling is a string ('none', 'static:S', 'dynamic' or 'dynamic:S0'), got {text!r}")
    kind, sep, value = text.strip().lower().partition(":")
    valid = "valid: 'auto', 'none', 'static:S' (e.g. 'static:1024'), 'dynamic', 'dynamic:S0' (initial scale)"
    bad_value = (kind == "none" and sep) or (kind == "static" and not value)
    if kind not in ("none", "static", "dynamic") or bad_value:
        raise ValueError(f"unknown loss scaling {text!r}; {valid}")
    if not value:
        return kind
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"loss scale in {text!r} is not a number; {valid}") from None
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"loss scale in {text!r} must be positive and finite; {valid}")
    stored, f32 = torch.tensor(scale, dtype=torch.float32).item(), torch.finfo(torch.float32)  # as a scaler holds it
    if not (f32.tiny <= stored < float("inf")):
        raise ValueError(
            f"loss scale in {text!r} ({scale:g}) is {stored!r} once stored in float32: it must be a finite, normal "
            f"float32 above 0 (between {f32.tiny:.3g} and {f32.max:.3g}); {valid}")
    return f"{kind}:{int(scale) if scale.is_integer() else repr(scale)}"


def make_scaler(scaling: str, device: torch.device | str | None = None) -> LossScaler:
    """A fresh loss scaler for a policy's ``scaling`` text ('none', 'static:S', 'dynamic', 'dynamic:S0'),
    placed on `device` when given.

    Example:
        >>> type(make_scaler("dynamic:1024")).__name__, make_scaler("dynamic:1024").loss_scale
        ('DynamicScaler', 1024.0)
    """
    kind, _, value = parse_scaling(scaling).partition(":")
    scaler: LossScaler
    if kind == "none":
        scaler = NoScaler()
    elif kind == "static":
        scaler = StaticScaler(float(value))
    else:
        # An initial scale above the default ceiling (2^24) raises the ceiling to it, one below the
        # default floor (1) lowers the floor to it, so that every "dynamic:S0" the string accepts makes
        # a scaler.
        scaler = DynamicScaler(init_scale=float(value), max_scale=max(2.0**24, float(value)),
                               min_scale=min(1.0, float(value))) if value else DynamicScaler()
    return scaler if device is None else scaler.to(device)
