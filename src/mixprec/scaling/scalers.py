"""The loss scaler interface (`LossScaler`) and the two scalers whose scale never moves.

A scaler owns the loss scale's arithmetic: ``scale(loss)``, ``1/S`` for the unscale, how `update` moves S.
It carries the step's skip bookkeeping (`mixprec.skips.SkipRecord`, ``scaler.skips``) so that one
state dict holds both; `mp.step` writes that record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..nonfinite import unscale_and_check_
from ..skips import SkipRecord
from ..versions import check_version
from .checks import check_loss_scale

__all__ = ["LossScaler", "NoScaler", "StaticScaler", "STATE_VERSION", "STORM_SKIPS"]

STATE_VERSION = 1

# Consecutive skipped steps after which `mp.step` calls a run a NaN storm, for scalers that do not move
# (NoScaler, StaticScaler): a burst of bad batches skips a handful of steps, 50 in a row is no burst.
STORM_SKIPS = 50


def as_flag(found_inf: torch.Tensor | bool | float, device: torch.device) -> torch.Tensor:
    """``found_inf`` as a 0-dim tensor on ``device``: a tensor from `unscale_and_check_`, or a Python
    bool/number (e.g. from a user's own overflow check). Syncs: no (a host value is copied to the device)."""
    if isinstance(found_inf, torch.Tensor):
        if found_inf.numel() != 1:
            raise ValueError(f"found_inf must hold one value, got a tensor of shape {tuple(found_inf.shape)}")
        return found_inf.reshape(()).to(device, non_blocking=True)
    if isinstance(found_inf, (bool, int, float)):
        return torch.tensor(float(found_inf), device=device)
    raise TypeError(f"found_inf must be a tensor or a bool/number, got {type(found_inf).__name__}")


class LossScaler:
    """Base class: a loss scale held in a 0-dim float32 tensor, and the step's skip record.

    Subclasses decide how `update` changes the scale (`_update_scale`). Every scaler checks gradients
    for inf/NaN, and `mp.step` skips a step whose gradients are not finite, whatever the scaler.

    Args:
        scale: the initial loss scale, a finite number > 0.
        device: where the state tensors live; move them later with `to`.

    Example:
        >>> s = StaticScaler(8.0)
        >>> s.scale(torch.tensor(0.5)).item(), s.loss_scale
        (4.0, 8.0)
    """

    kind = "LossScaler"

    def __init__(self, scale: float = 1.0, device: torch.device | str = "cpu") -> None:
        self._lowest_scale = check_loss_scale("scale", scale)  # the lowest scale it can hold (host)
        self.device = torch.device(device)
        self._scale = torch.tensor(float(scale), dtype=torch.float32, device=self.device)
        self.skips = SkipRecord(self.device)  # mp.step's bookkeeping, saved with the scale
        self.attached: dict[str, Any] = {}  # more scaling state saved with the scale (`attach`)

    def attach(self, name: str, state: Any) -> None:
        """Save `state` (with ``state_dict()``, ``check_state_dict(d)``, ``load_state_dict(d)``) in this scaler's
        state dict under `name`: `mp.prepare` attaches FP8 delayed scaling's amax histories as ``"fp8"``, so the one
        checkpoint of the scaler holds every scale of the run. A dict without the entry leaves it as it is.
        `mp.step` calls its ``step_(group)``, if it has one, once a step on every rank."""
        self.attached[name] = state

    # ----- the hot path -------------------------------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss * scale``; call ``.backward()`` on the result.

        Syncs: no.

        Example:
            >>> StaticScaler(4.0).scale(torch.tensor(0.25)).item()
            1.0
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"scale() takes the loss tensor, got {type(loss).__name__}")
        self._check_device(loss.device, "the loss")
        self.skips.scaled()
        return loss * self._scale

    def unscale_and_check_(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Multiply every gradient in place by 1/scale; return 1.0 (0-dim tensor) if any was inf/NaN.

        One fused pass per (device, dtype) group, see `mixprec.nonfinite.unscale_and_check_`.

        Syncs: no.

        Example:
            >>> g = [torch.tensor([8.0])]
            >>> float(StaticScaler(4.0).unscale_and_check_(g)), g[0].item()
            (0.0, 2.0)
        """
        for device in {g.device for g in grads}:
            self._check_device(device, "a gradient")
        # 1/scale rounded once from float64, as torch.amp.GradScaler computes it.
        if self.device.type == "mps":  # no float64 there
            inv_scale = 1 / self._scale
        else:
            inv_scale = self._scale.double().reciprocal().float()
        # A scale below 1 multiplies the gradients up: then the unscaled values are checked too.
        return unscale_and_check_(grads, inv_scale, check_unscaled=self._lowest_scale < 1)

    def update(self, found_inf: torch.Tensor | bool | float) -> None:
        """Record one step's result: count it as skipped if ``found_inf`` is nonzero, and move the scale.

        ``found_inf`` is the tensor `unscale_and_check_` returned (or a Python bool/number). Call once
        per step, after `unscale_and_check_` (`mp.step` does).

        Syncs: no.

        Example:
            >>> s = NoScaler(); s.update(torch.tensor(1.0)); int(s.skipped_steps)
            1
        """
        overflow = as_flag(found_inf, self.device) != 0
        self.skips.count(overflow)
        self._update_scale(overflow)

    def _update_scale(self, overflow: torch.Tensor) -> None:
        """Move the scale after a step (``overflow``: 0-dim bool tensor); a fixed scale stays. Syncs: no."""

    def observe(self, found_inf: bool, loss_scale: float, in_a_row: int | None = None) -> None:
        """Host-side bookkeeping with values already read on the host (by `mp.step`'s one sync).

        ``in_a_row`` is `skipped_in_a_row` after this step, when the caller read it (so reading the
        property later costs no sync). `DynamicScaler` also warns once (or raises) at its floor.

        Syncs: no.
        """
        self.skips.observe(in_a_row)

    def storm_limit(self) -> int:
        """Consecutive skipped steps after which `mp.step` stops the run as a NaN storm (its ``"auto"``).

        Here `STORM_SKIPS` (50): a fixed scale never changes between attempts, so 50 overflowing
        batches in a row are no burst. `DynamicScaler` allows for its back-off as well.

        Example:
            >>> StaticScaler(1024.0).storm_limit()
            50
        """
        return STORM_SKIPS

    # ----- reading and moving the state -----------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """The current loss scale as a Python float. Syncs: yes (reads a device tensor)."""
        return float(self._scale.item())

    @property
    def scales_loss(self) -> bool:
        """Whether `scale` can change the loss (a scale other than 1): then a step on gradients it did not
        scale is refused. Syncs: no."""
        return self._lowest_scale != 1.0

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current loss scale as a 0-dim float32 tensor on the scaler's device. Syncs: no."""
        return self._scale

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many steps `update` has seen with inf/NaN gradients: 0-dim int64 tensor. Syncs: no."""
        return self.skips.skipped

    @property
    def skipped_in_a_row_tensor(self) -> torch.Tensor:
        """Consecutive skipped steps up to the last `update` (0 after a clean one): 0-dim int64. Syncs: no."""
        return self.skips.in_a_row_tensor

    @property
    def skipped_in_a_row(self) -> int:
        """Consecutive skipped steps up to the last `update`, for `mp.step`'s NaN-storm guard.

        Syncs: no after a synced `mp.step` (it read the count), yes after ``mp.step(..., sync=False)``.

        Example:
            >>> s = StaticScaler(4.0)
            >>> for found_inf in (1.0, 0.0, 1.0, 1.0):
            ...     s.update(torch.tensor(found_inf))
            >>> s.skipped_in_a_row, int(s.skipped_in_a_row_tensor), int(s.skipped_steps)
            (2, 2, 3)
        """
        return self.skips.in_a_row

    @property
    def known_skipped_in_a_row(self) -> int | None:
        """`skipped_in_a_row` as last read on the host, or None when it may have changed since. Syncs: no."""
        return self.skips.known_in_a_row

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"_scale": self._scale}

    def to(self, device: torch.device | str) -> LossScaler:
        """Move the scaler's state to ``device`` (the training device); returns self.

        Example:
            >>> NoScaler().to("cpu").device
            device(type='cpu')
        """
        self.device = torch.device(device)
        for name, tensor in self._state_tensors().items():
            setattr(self, name, tensor.to(self.device))
        self.skips.to(self.device)
        return self

    def _check_device(self, device: torch.device, what: str) -> None:
        if device.type != self.device.type:
            raise ValueError(
                f"{what} is on {device} but the {type(self).__name__} state is on {self.device}: "
                f"move the scaler with scaler.to({str(device)!r}) (or create it with device=...)")

    # ----- checkpoints ----------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """A versioned dict of plain Python numbers (safe for ``torch.load(weights_only=True)``).

        Keys (version 1): version, kind, scale, skipped_steps, skipped_in_a_row, then the scaler's options.

        Syncs: yes.

        Example:
            >>> StaticScaler(8.0).state_dict()["scale"]
            8.0
        """
        return {"version": STATE_VERSION, "kind": self.kind, "scale": self.loss_scale, **self.skips.state_dict(),
                **self._config(), **{name: state.state_dict() for name, state in self.attached.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every field written by `state_dict` (the state stays on this scaler's device).

        Raises:
            ValueError: the dict is not a state dict of this kind and version of scaler.

        Example:
            >>> a, b = StaticScaler(8.0), StaticScaler(1.0)
            >>> b.load_state_dict(a.state_dict()); b.loss_scale
            8.0
        """
        expected = set(self.state_dict())
        if not isinstance(state_dict, dict):
            raise ValueError(f"load_state_dict takes a dict from state_dict(), got {type(state_dict).__name__}")
        if "kind" not in state_dict and "_growth_tracker" in state_dict:
            raise ValueError(
                f"this is a torch.amp.GradScaler state dict, not a mixprec {self.kind!r} state dict; mixprec "
                f"scalers load only their own (make a DynamicScaler(init_scale=...) with the GradScaler's scale)")
        if "kind" not in state_dict:
            raise ValueError(
                f"this dict has no 'kind': it is not a mixprec scaler state dict (keys: {sorted(state_dict)}); "
                f"load what a scaler's state_dict() returned")
        if not isinstance(state_dict["kind"], str) or not state_dict["kind"]:
            raise ValueError(
                f"this state dict's 'kind' is {state_dict['kind']!r}, not a scaler's name: expected {self.kind!r} "
                f"(what {self.kind}.state_dict() writes); load what a scaler's state_dict() returned")
        if state_dict["kind"] != self.kind:
            raise ValueError(
                f"this state dict is for {state_dict['kind']!r}, not {self.kind!r}: load it into a "
                f"{state_dict['kind']} (or create the scaler that wrote it)")
        check_version(state_dict.get("version"), STATE_VERSION, "scaler")
        if "fp8" in state_dict and "fp8" not in self.attached:
            raise ValueError("this scaler state dict holds FP8 delayed-scaling histories ('fp8'), but this scaler's "
                             "model has no delayed FP8 layers: resume under the policy that wrote it (fp8=delayed), "
                             "or delete the 'fp8' entry to start the new policy's scales afresh")
        # Dicts written before the run of skips was saved restart it from 0; attached state missing from a
        # dict stays as it is.
        optional = {"skipped_in_a_row", *self.attached}
        if set(state_dict) | optional != expected:
            missing = sorted(expected - set(state_dict) - optional)
            extra = sorted(set(state_dict) - expected)
            raise ValueError(
                f"{self.kind} state dict has missing keys {missing} and unexpected keys {extra}; "
                f"expected exactly {sorted(expected)}")
        self.skips.check_state_dict(state_dict)  # all checked before anything is changed
        for name, state in self.attached.items():
            if name in state_dict:
                state.check_state_dict(state_dict[name])
        self._load_config(state_dict)
        self._scale = torch.tensor(float(state_dict["scale"]), dtype=torch.float32, device=self.device)
        self.skips.load_state_dict(state_dict)
        for name, state in self.attached.items():
            if name in state_dict:
                state.load_state_dict(state_dict[name])

    def _load_config(self, state_dict: dict[str, Any]) -> None:
        self._lowest_scale = check_loss_scale("scale", state_dict["scale"])

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({config}{', ' if config else ''}device={str(self.device)!r})"


class NoScaler(LossScaler):
    """No loss scaling (S = 1), for FP32 and BF16 runs; gradients are still checked for inf/NaN.

    Example:
        >>> NoScaler().loss_scale
        1.0
    """

    kind = "NoScaler"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(1.0, device)

    def _load_config(self, state_dict: dict[str, Any]) -> None:
        if float(state_dict["scale"]) != 1.0:
            raise ValueError(f"a NoScaler state dict must have scale 1.0, got {state_dict['scale']!r}")


class StaticScaler(LossScaler):
    """A fixed loss scale S; a step whose gradients overflow is skipped and counted.

    Args:
        scale: S, a finite number > 0 (a power of two keeps the unscaling exact).
        device: where the state lives; see `LossScaler.to`.

    Example:
        >>> StaticScaler(2**10).loss_scale
        1024.0
    """

    kind = "StaticScaler"

    def __init__(self, scale: float, device: torch.device | str = "cpu") -> None:
        super().__init__(scale, device)
