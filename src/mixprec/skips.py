"""What `mp.step` records about its steps: the skipped-step counters and which backward was stepped.

This is the step's bookkeeping, not the loss scale's arithmetic: how many steps were skipped (in all,
and in a row, for the NaN-storm guard), whether `mp.step` already consumed this backward's gradients,
and what `mp.unscale_` unscaled for it. A loss scaler carries one `SkipRecord` (``scaler.skips``) so
that one ``scaler.state_dict()`` holds both, as checkpoints always have; `mp.step` reads and writes it.

The counters are 0-dim tensors on the scaler's device, updated with tensor ops (no sync); the run of
skips is cached on the host whenever `mp.step`'s one sync has read it.

Example:
    >>> import torch
    >>> record = SkipRecord()
    >>> for found_inf in (1.0, 0.0, 1.0, 1.0):
    ...     record.count(torch.tensor(found_inf))
    >>> int(record.skipped), record.in_a_row
    (3, 2)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["SkipRecord", "read_count"]


class SkipRecord:
    """Skipped-step counters and the stepped/unscaled state of the current backward.

    Args:
        device: where the counters live; move them with `to`.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.in_a_row_tensor = torch.zeros((), dtype=torch.int64, device=self.device)  # consecutive skips
        self.known_in_a_row: int | None = 0  # its value as last read on the host; None: changed since
        self._scale_calls = 0  # scaler.scale() calls so far, and how many there had been at the last mp.step
        self._stepped_at: int | None = None
        # What mp.unscale_ did for this backward: (scale calls then, the optimizers' ids, their found-inf flag).
        self._unscaled: tuple[int, list[int], torch.Tensor] | None = None

    # ----- one backward, one step -----------------------------------------------------------------
    def scaled(self) -> None:
        """Record one ``scaler.scale(loss)`` call: a new backward's gradients are on their way."""
        self._scale_calls += 1

    def check_not_stepped(self, scales_loss: bool = True) -> None:
        """Raise if `mp.step` already ran since the last ``scaler.scale`` (no sync); warn at the first step
        if ``scale`` was never called on a scaler that `scales_loss`.

        The update was then already made from these gradients, and the scale may have changed since
        they were scaled. Never scaled, they are divided by a scale they may not have been multiplied
        by (gradients scaled by hand, ``(loss * scaler.scale_tensor).backward()``, are fine: a warning,
        once). ``loss.backward()`` without ``scale`` is fine with a NoScaler.
        """
        if not self._scale_calls and scales_loss and self._stepped_at is None:
            warnings.warn(
                "mp.step: scaler.scale(loss) was never called, but this scaler's scale is not 1: if these "
                "gradients come from loss.backward() unscaled, the update is that many times too small. Call "
                "scaler.scale(loss).backward(), or use a policy with scaling=none (mp.NoScaler)",
                UserWarning, stacklevel=4)
        if self._scale_calls and self._stepped_at == self._scale_calls:
            raise RuntimeError(
                "mp.step was already called since the last scaler.scale(loss).backward(): stepping again "
                "would update from the same gradients, unscaled by a scale that may have changed since. "
                "If several optimizers share this backward, step them together: "
                "mp.step([optimizer_a, optimizer_b], scaler)")

    def mark_stepped(self) -> None:
        """Record that `mp.step` consumed the gradients of the ``scale`` calls so far."""
        self._stepped_at = self._scale_calls

    @property
    def unstepped(self) -> bool:
        """Whether gradients were scaled since the last `mp.step` (no step has consumed them yet)."""
        return self._scale_calls != (self._stepped_at or 0)

    def keep_unscaled(self, optimizers: list[Any], found_inf: torch.Tensor) -> None:
        """Record that `mp.unscale_` unscaled this backward's gradients for `optimizers` (found-inf: theirs)."""
        self._unscaled = (self._scale_calls, [id(o) for o in optimizers], found_inf)

    def take_unscaled(self, optimizers: list[Any], peek: bool = False) -> torch.Tensor | None:
        """The found-inf flag `keep_unscaled` recorded for this backward (forgotten unless `peek`), or None."""
        if self._unscaled is None or self._unscaled[0] != self._scale_calls:
            return None
        if self._unscaled[1] != [id(o) for o in optimizers]:
            raise RuntimeError("mp.step got other optimizers than mp.unscale_ unscaled for this backward: pass "
                               "the same optimizers (a list, when several share the backward) to both")
        found_inf = self._unscaled[2]
        if not peek:
            self._unscaled = None
        return found_inf

    # ----- the counters ---------------------------------------------------------------------------
    def count(self, overflow: torch.Tensor) -> None:
        """Count one step: skipped where ``overflow`` (a 0-dim bool tensor on this device) is true. Syncs: no."""
        skipped = overflow.to(self.skipped.dtype)
        self.skipped += skipped
        self.in_a_row_tensor = (self.in_a_row_tensor + 1) * skipped
        self.known_in_a_row = None

    def observe(self, in_a_row: int | None) -> None:
        """The run of skips after this step as `mp.step`'s sync read it (None: not read). Syncs: no."""
        if in_a_row is not None:
            self.known_in_a_row = in_a_row

    @property
    def in_a_row(self) -> int:
        """Consecutive skipped steps up to the last `count`. Syncs: only when not read since (``sync=False``)."""
        if self.known_in_a_row is None:
            self.known_in_a_row = int(self.in_a_row_tensor.item())
        return self.known_in_a_row

    def to(self, device: torch.device | str) -> SkipRecord:
        """Move the counters to ``device``; returns self."""
        self.device = torch.device(device)
        self.skipped, self.in_a_row_tensor = self.skipped.to(self.device), self.in_a_row_tensor.to(self.device)
        return self

    # ----- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The counters as plain ints (the scaler's state dict holds them). Syncs: yes."""
        return {"skipped_steps": int(self.skipped.item()), "skipped_in_a_row": self.in_a_row}

    @staticmethod
    def check_state_dict(state_dict: dict[str, Any]) -> tuple[int, int]:
        """(skipped steps, skipped in a row) from a scaler state dict, or a ValueError naming the bad one;
        a dict written before the run of skips was saved restarts it from 0."""
        in_a_row = read_count(state_dict, "skipped_in_a_row") if "skipped_in_a_row" in state_dict else 0
        skipped = read_count(state_dict, "skipped_steps")
        if in_a_row > skipped:
            raise ValueError(f"scaler state dict: skipped_in_a_row ({in_a_row}) cannot exceed skipped_steps "
                             f"({skipped})")
        return skipped, in_a_row

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters (checked as `check_state_dict` does)."""
        skipped, self.known_in_a_row = self.check_state_dict(state_dict)
        self.skipped = torch.tensor(skipped, dtype=torch.int64, device=self.device)
        self.in_a_row_tensor = torch.tensor(self.known_in_a_row, dtype=torch.int64, device=self.device)


def read_count(state_dict: dict[str, Any], key: str) -> int:
    """A scaler state dict's counter: an integer >= 0 (a tensor holding one is fine), else a ValueError naming it.

    Example:
        >>> read_count({"skipped_steps": torch.tensor(3)}, "skipped_steps")
        3
    """
    value = state_dict[key]
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"scaler state dict: {key} must be an integer >= 0, got {value!r}")
    return number
