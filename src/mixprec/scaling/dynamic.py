"""`DynamicScaler`: a loss scale that backs off on overflow and grows after a run of clean steps."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..skips import read_count
from .checks import LARGEST_SCALE, validate_dynamic
from .scalers import STORM_SKIPS, LossScaler

__all__ = ["DynamicScaler", "LossScaleFloorError"]


class LossScaleFloorError(RuntimeError):
    """Raised by a `DynamicScaler(raise_at_min_scale=True)` when gradients overflow at ``min_scale``."""


def _times(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """``float32(scale * factor)`` computed in float64, as torch's ``_amp_update_scale_`` does."""
    if scale.device.type == "mps":  # no float64 there
        return scale * factor
    return (scale.double() * factor).float()


class DynamicScaler(LossScaler):
    """Automatic loss scale: back off on overflow, grow after a run of clean steps.

    Per `update(found_inf)` (all tensor ops, no host sync):

    * overflow: the clean-step counter resets and the hysteresis counter drops by one; once it is at
      zero, ``scale = max(scale * backoff_factor, min_scale)`` (on this and every later overflow until
      the scale grows again, as in Megatron-LM's DynamicGradScaler).
    * clean step: the clean-step counter rises; at ``growth_interval`` it resets, the hysteresis
      counter is refilled and ``scale = min(scale * growth_factor, max_scale)`` (kept unchanged if that
      would be inf, as torch.amp.GradScaler does).

    With ``hysteresis=1, min_scale=2**-126, max_scale=inf`` the trajectory equals torch.amp.GradScaler's
    (while its scale stays above 2^-126).
    At the floor (overflow while ``scale <= min_scale``) the scaler never crashes: steps keep being
    skipped and counted, and `observe` (called by `mp.step`) warns once; with
    ``raise_at_min_scale=True`` it raises `LossScaleFloorError` instead.

    Args:
        init_scale: first scale, in ``[min_scale, max_scale]``.
        growth_factor: > 1.
        backoff_factor: in (0, 1).
        growth_interval: clean steps before growing, >= 1.
        hysteresis: overflows tolerated before backing off, >= 1.
        min_scale: floor, a number that float32 stores as a finite normal number > 0 (``SCALE_RANGE``;
            a smaller floor would let the scale reach 0, and 1/0 turns every gradient into inf/NaN).
        max_scale: ceiling, >= min_scale, may be inf (the scale itself never grows to inf).
        raise_at_min_scale: raise instead of warning when gradients overflow at the floor.
        device: where the state lives; see `LossScaler.to`.

    Example:
        >>> s = DynamicScaler(init_scale=8.0, growth_interval=2, hysteresis=1)
        >>> for found_inf in [1.0, 0.0, 0.0]:
        ...     s.update(torch.tensor(found_inf))
        >>> s.loss_scale  # 8 -> backoff 4 -> grow after two clean steps -> 8
        8.0
    """

    kind = "DynamicScaler"

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        raise_at_min_scale: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        options: dict[str, Any] = dict(growth_factor=growth_factor, backoff_factor=backoff_factor,
                                       growth_interval=growth_interval, hysteresis=hysteresis,
                                       min_scale=min_scale, max_scale=max_scale)
        validate_dynamic(init_scale, **options)
        super().__init__(init_scale, device)
        self._set_options(**options, raise_at_min_scale=raise_at_min_scale)
        self._warned_at_floor = False
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)
        self._hysteresis_tracker = torch.full((), self.hysteresis, dtype=torch.int32, device=self.device)

    def _set_options(self, growth_factor: float, backoff_factor: float, growth_interval: int, hysteresis: int,
                     min_scale: float, max_scale: float, raise_at_min_scale: bool) -> None:
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.raise_at_min_scale = bool(raise_at_min_scale)
        self._lowest_scale = self.min_scale

    @property
    def scales_loss(self) -> bool:
        return not self.min_scale == self.max_scale == 1.0

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super()._state_tensors(),
            "_growth_tracker": self._growth_tracker,
            "_hysteresis_tracker": self._hysteresis_tracker}

    def _update_scale(self, overflow: torch.Tensor) -> None:
        """Back off or grow the scale after one step (see the class docstring). Syncs: no.

        Example:
            >>> s = DynamicScaler(init_scale=8.0, hysteresis=2)
            >>> s.update(torch.tensor(1.0)); s.loss_scale  # first overflow: hysteresis absorbs it
            8.0
            >>> s.update(torch.tensor(1.0)); s.loss_scale
            4.0
        """
        scale, growth, hyst = self._scale, self._growth_tracker, self._hysteresis_tracker

        # Overflow branch: count down the hysteresis, back off once it is used up.
        hyst_after_overflow = torch.clamp(hyst - 1, min=0)
        backed_off = torch.clamp(_times(scale, self.backoff_factor), min=self.min_scale)
        scale_after_overflow = torch.where(hyst_after_overflow == 0, backed_off, scale)

        # Clean branch: count up; at growth_interval grow (unless that is inf) and refill the hysteresis.
        clean_steps = growth + 1
        grow_now = clean_steps >= self.growth_interval
        grown = torch.clamp(_times(scale, self.growth_factor), max=self.max_scale)
        grown = torch.where(torch.isfinite(grown), grown, scale)
        scale_after_clean = torch.where(grow_now, grown, scale)
        growth_after_clean = torch.where(grow_now, torch.zeros_like(growth), clean_steps)
        hyst_after_clean = torch.where(grow_now, torch.full_like(hyst, self.hysteresis), hyst)

        self._scale = torch.where(overflow, scale_after_overflow, scale_after_clean)
        self._growth_tracker = torch.where(overflow, torch.zeros_like(growth), growth_after_clean)
        self._hysteresis_tracker = torch.where(overflow, hyst_after_overflow, hyst_after_clean)

    def observe(self, found_inf: bool, loss_scale: float, in_a_row: int | None = None) -> None:
        """Warn once (or raise) when a step overflowed while the scale was at its floor.

        ``found_inf`` and ``loss_scale`` are the values `mp.step` read in its one sync (the scale
        the step's gradients were scaled by).

        Syncs: no (yes, once, when it warns or raises: it reads the skipped-step counter).

        Raises:
            LossScaleFloorError: with ``raise_at_min_scale=True``.
        """
        super().observe(found_inf, loss_scale, in_a_row)
        if not (found_inf and loss_scale <= self.min_scale):
            return
        message = (
            f"gradients overflow even at the minimum loss scale {self.min_scale:g}: the step was skipped "
            f"({int(self.skips.skipped.item())} skipped so far). Something other than the loss scale produces "
            f"inf/NaN (look for an overflowing activation or a NaN loss), or lower min_scale.")
        if self.raise_at_min_scale:
            raise LossScaleFloorError(message)
        if not self._warned_at_floor:
            self._warned_at_floor = True
            warnings.warn(message + " (warned once; steps keep being skipped)", RuntimeWarning, stacklevel=3)

    def storm_limit(self) -> int:
        """Consecutive skipped steps after which `mp.step` stops the run as a NaN storm (its ``"auto"``).

        Twice the longest run of skips a healthy start-up or recovery can take: backing off from the
        ceiling (at most the largest float32) down to the floor, plus the overflows the hysteresis
        absorbs first; and at least `STORM_SKIPS`. So a start at 2^16 descending to a good scale never
        trips it, and a run overflowing at the floor stops after a bounded number of steps. Defaults
        (2^24 -> 1, backoff 0.5, hysteresis 2): 2 * (24 + 2) = 52.

        Example:
            >>> DynamicScaler().storm_limit(), DynamicScaler(hysteresis=1, min_scale=2.0**-8).storm_limit()
            (52, 66)
        """
        top = min(self.max_scale, LARGEST_SCALE)
        descent = math.ceil(math.log(top / self.min_scale) / -math.log(self.backoff_factor))
        return max(STORM_SKIPS, 2 * (descent + self.hysteresis))

    def _config(self) -> dict[str, Any]:
        names = ("growth_factor", "backoff_factor", "growth_interval", "hysteresis", "min_scale", "max_scale",
                 "raise_at_min_scale")
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict[str, Any]:
        """Versioned dict: scale, trackers, skipped steps, warned flag and every option. Syncs: yes.

        Example:
            >>> DynamicScaler(init_scale=4.0).state_dict()["hysteresis_tracker"]
            2
        """
        return {
            **super().state_dict(),
            "growth_tracker": int(self._growth_tracker.item()),
            "hysteresis_tracker": int(self._hysteresis_tracker.item()),
            "warned_at_floor": self._warned_at_floor}

    def _load_config(self, state_dict: dict[str, Any]) -> None:
        options = {k: state_dict[k] for k in self._config()}
        validate_dynamic(state_dict["scale"], **{k: v for k, v in options.items() if k != "raise_at_min_scale"})
        growth, hysteresis = read_count(state_dict, "growth_tracker"), read_count(state_dict, "hysteresis_tracker")
        # The trackers count within their options: clean steps before growing, overflows left before backing off.
        if growth >= options["growth_interval"]:
            raise ValueError(f"scaler state dict: growth_tracker ({growth}) must be < growth_interval "
                             f"({options['growth_interval']})")
        if hysteresis > options["hysteresis"]:
            raise ValueError(f"scaler state dict: hysteresis_tracker ({hysteresis}) must be <= hysteresis "
                             f"({options['hysteresis']})")
        if not isinstance(state_dict["warned_at_floor"], bool):
            raise ValueError(f"scaler state dict: warned_at_floor must be True or False, "
                             f"got {state_dict['warned_at_floor']!r}")
        self._set_options(**options)
        self._warned_at_floor = state_dict["warned_at_floor"]
        self._growth_tracker = torch.tensor(growth, dtype=torch.int32, device=self.device)
        self._hysteresis_tracker = torch.tensor(hysteresis, dtype=torch.int32, device=self.device)
