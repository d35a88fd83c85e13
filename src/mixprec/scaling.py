"""Loss scalers: multiply the loss by S before backward, unscale the gradients by 1/S before the update.

Small gradients (the paper's SSD run: activation gradients in [2^-27, 2^-24)) flush to zero in FP16.
Multiplying the loss by S shifts every gradient up by log2(S) binades so they survive; the weight
gradients are multiplied by 1/S in FP32 before clipping, weight decay and the optimizer step.

Three scalers share one interface (`LossScaler`):

* `NoScaler`: S = 1. Still checks gradients for inf/NaN so that `mp.step` skips a poisoned step.
* `StaticScaler(S)`: a fixed S; a step whose gradients overflow is skipped.
* `DynamicScaler`: S backs off on overflow (after `hysteresis` overflows) and grows after
  `growth_interval` clean steps, clamped to ``[min_scale, max_scale]``.

All state (scale, trackers, the skipped-step counters) lives in 0-dim tensors on the scaler's device and
is updated with tensor ops, so `scale`, `unscale_and_check_` and `update` never wait for the device.
The device is chosen explicitly: the state is created on ``device`` (default CPU) and moved with
`LossScaler.to`; there is no lazy initialisation. The only reads of these values on the host are the
`loss_scale` property, `state_dict`, and the one read that `mp.step` does per step.

Example:
    >>> import torch
    >>> scaler = DynamicScaler(init_scale=2.0**10)
    >>> w = torch.ones(3, requires_grad=True)
    >>> scaler.scale((w * 2.0**-20).sum()).backward()  # w.grad holds 2^-20 * 2^10
    >>> found_inf = scaler.unscale_and_check_([w.grad])  # w.grad now holds 2^-20
    >>> scaler.update(found_inf)
    >>> float(found_inf), w.grad.tolist() == [2.0**-20] * 3
    (0.0, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["LossScaler", "NoScaler", "StaticScaler", "DynamicScaler", "LossScaleFloorError", "unscale_and_check_",
           "find_nonfinite", "check_loss_scale", "parse_scaling", "make_scaler"]

STATE_VERSION = 1

# torch's fused unscale+check kernel exists for these device types and dtypes (checked on torch 2.4+).
_FUSED_DEVICE_TYPES = {"cpu", "cuda", "xpu"}
_FUSED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}

# A loss scale lives in a float32 tensor: it must be stored there as a finite, normal number, so that
# S and 1/S (at most 2^126) are both finite and nonzero. 1e-45 would be stored as 0.0 and 1e39 as inf.
SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # 2^-126
LARGEST_SCALE = torch.finfo(torch.float32).max
SCALE_RANGE = f"[2^-126 ({SMALLEST_SCALE:.3g}), {LARGEST_SCALE:.3g}]"

# Consecutive skipped steps after which `mp.step` calls a run a NaN storm, for scalers that do not move
# (NoScaler, StaticScaler): a burst of bad batches skips a handful of steps, 50 in a row is no burst.
STORM_SKIPS = 50


class LossScaleFloorError(RuntimeError):
    """Raised by a `DynamicScaler(raise_at_min_scale=True)` when gradients overflow at ``min_scale``."""


# ----- the fused pass over the gradients ---------------------------------------------------------


def _dense_(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor itself; a sparse COO gradient's values (nn.Embedding(sparse=True)'s), which alias it.

    FP16 ones are coalesced first, as torch.amp.GradScaler does: duplicate indices whose scaled values sum
    past 65504 overflow here, not later in the optimizer. In place (``copy_``): ``p.grad`` stays the tensor
    the optimizer reads. (Coalescing syncs on CUDA, as in torch.)
    """
    if t.is_sparse and t.dtype == torch.float16 and not t.is_coalesced():
        t.copy_(t.coalesce())
    return t._values() if t.is_sparse else t


def group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """The non-empty `tensors` (a sparse one: its values) by (device, dtype), for one foreach call each."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in map(_dense_, tensors):
        if t.numel():  # an empty tensor (a rank's empty FSDP shard) holds nothing to check or unscale
            groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def unscale_and_check_(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor,
                       check_unscaled: bool = False) -> torch.Tensor:
    """Multiply every gradient in place by ``inv_scale`` and report whether any was inf/NaN.

    One fused pass per (device, dtype) group: torch's ``_amp_foreach_non_finite_check_and_unscale_``
    where it exists for the device and dtype (it checks the scaled values, before the multiply),
    otherwise a pure-torch foreach fallback (a foreach multiply, then an inf-norm per tensor, which is
    inf/NaN exactly when the tensor holds an inf/NaN).

    With ``inv_scale <= 1`` a finite gradient stays finite when unscaled, so checking before the multiply
    is enough. With ``inv_scale > 1`` (a loss scale below 1) a finite gradient can overflow when unscaled:
    pass ``check_unscaled=True`` to check the unscaled values as well (one more pass).

    Args:
        grads: gradient tensors, on any devices and floating dtypes; a sparse COO one (nn.Embedding(sparse=True))
            has its values unscaled and checked, FP16 ones coalesced first, as torch.amp.GradScaler does.
        inv_scale: 0-dim float32 tensor, ``1 / scale``; the result lives on its device.
        check_unscaled: also check the gradients after the multiply.

    Returns:
        a 0-dim float32 tensor on ``inv_scale``'s device: 1.0 if any gradient had an inf/NaN, else 0.0.

    Syncs: no.

    Example:
        >>> g = [torch.tensor([2.0, 4.0]), torch.tensor([float("inf")])]
        >>> float(unscale_and_check_(g, torch.tensor(0.5))), g[0].tolist()
        (1.0, [1.0, 2.0])
    """
    found_infs: list[torch.Tensor] = []
    for (device, dtype), group in group_by_device_and_dtype(grads).items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        inv = inv_scale.to(device=device, non_blocking=True)
        fused = device.type in _FUSED_DEVICE_TYPES and dtype in _FUSED_DTYPES
        if fused:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        else:
            torch._foreach_mul_(group, inv.to(dtype))
        if check_unscaled or not fused:  # inf * x and NaN * x stay non-finite: this checks both
            norms = torch._foreach_norm(group, ord=math.inf)
            found = torch.maximum(found, torch.logical_not(torch.isfinite(torch.stack(norms)).all()).float())
        found_infs.append(found)
    if not found_infs:
        return torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    if len(found_infs) == 1 and found_infs[0].device == inv_scale.device:
        return found_infs[0]
    total = torch.stack([f.to(inv_scale.device, non_blocking=True) for f in found_infs]).sum()
    return torch.clamp(total, max=1.0)


def find_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor inf/NaN flags: a bool tensor with one entry per gradient (on the first one's device).

    Meant for the cold path of a skipped step (e.g. naming the parameters whose gradients overflowed):
    the gradients keep their inf/NaN after unscaling, so this can run after `mp.step`.

    Syncs: no (reading the result does).

    Example:
        >>> find_nonfinite([torch.ones(2), torch.tensor([1.0, float("nan")])]).tolist()
        [False, True]
    """
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    device = grads[0].device
    flags = torch.zeros(len(grads), dtype=torch.bool, device=device)
    grads = [_dense_(g) for g in grads]
    index = {id(g): i for i, g in enumerate(grads)}
    for group in group_by_device_and_dtype(grads).values():
        norms = torch.stack(torch._foreach_norm(group, ord=math.inf)).to(device)
        where = torch.tensor([index[id(g)] for g in group], device=device)
        flags[where] = torch.logical_not(torch.isfinite(norms))
    return flags


def _as_flag(found_inf: torch.Tensor | bool | float, device: torch.device) -> torch.Tensor:
    """``found_inf`` as a 0-dim tensor on ``device``: a tensor from `unscale_and_check_`, or a Python
    bool/number (e.g. from a user's own overflow check). Syncs: no (a host value is copied to the device)."""
    if isinstance(found_inf, torch.Tensor):
        if found_inf.numel() != 1:
            raise ValueError(f"found_inf must hold one value, got a tensor of shape {tuple(found_inf.shape)}")
        return found_inf.reshape(()).to(device, non_blocking=True)
    if isinstance(found_inf, (bool, int, float)):
        return torch.tensor(float(found_inf), device=device)
    raise TypeError(f"found_inf must be a tensor or a bool/number, got {type(found_inf).__name__}")


def _times(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """``float32(scale * factor)`` computed in float64, as torch's ``_amp_update_scale_`` does."""
    if scale.device.type == "mps":  # no float64 there
        return scale * factor
    return (scale.double() * factor).float()


# ----- the scalers --------------------------------------------------------------------------------


class LossScaler:
    """Base class: a loss scale held in a 0-dim float32 tensor, and a skipped-step counter.

    Subclasses decide how `update` changes the scale. Every scaler checks gradients for inf/NaN, and
    `mp.step` skips a step whose gradients are not finite, whatever the scaler.

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
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self._in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)  # consecutive skipped steps
        self._in_a_row_read: int | None = 0  # its value as last read on the host; None: changed since
        self._scale_calls = 0  # scale() calls so far, and how many there had been at the last mp.step
        self._stepped_at: int | None = None
        # What mp.unscale_ did for this backward: (scale calls then, the optimizers' ids, their found-inf flag).
        self._unscaled: tuple[int, list[int], torch.Tensor] | None = None

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
        self._scale_calls += 1
        return loss * self._scale

    def check_not_stepped(self) -> None:
        """Raise if `mp.step` already ran since the last `scale` (called by `mp.step`; no sync).

        The update was then already made from these gradients, and the scale may have changed since
        they were scaled. Not checked for a scaler whose `scale` was never called (``loss.backward()``
        with a NoScaler, say).
        """
        if self._scale_calls and self._stepped_at == self._scale_calls:
            raise RuntimeError(
                "mp.step was already called since the last scaler.scale(loss).backward(): stepping again "
                "would update from the same gradients, unscaled by a scale that may have changed since. "
                "If several optimizers share this backward, step them together: "
                "mp.step([optimizer_a, optimizer_b], scaler)")

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

    def mark_stepped(self) -> None:
        """Record that `mp.step` consumed the gradients of the scale() calls so far."""
        self._stepped_at = self._scale_calls

    def refuse_unscaled_step(self, optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
        """An optimizer step pre-hook (`mp.prepare` registers it): refuse ``optimizer.step()`` on gradients
        this scaler scaled that no `mp.step` has unscaled and checked (a NoScaler's are as they were)."""
        if self._scale_calls != (self._stepped_at or 0) and not isinstance(self, NoScaler):
            raise RuntimeError(
                f"optimizer.step() after scaler.scale(loss).backward(): the gradients are still multiplied by "
                f"the loss scale ({self.loss_scale:g}) and unchecked for inf/NaN. Step with "
                f"mp.step(optimizer, scaler), which unscales, checks, clips and skips overflowing steps")

    def unscale_and_check_(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Multiply every gradient in place by 1/scale; return 1.0 (0-dim tensor) if any was inf/NaN.

        One fused pass per (device, dtype) group, see the module-level `unscale_and_check_`.

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

    def update(self, found_inf: torch.Tensor) -> None:
        """Record one step's result: count it as skipped if ``found_inf`` is nonzero.

        ``found_inf`` is the tensor `unscale_and_check_` returned (or a Python bool/number).

        Subclasses also adjust the scale. Call once per step, after `unscale_and_check_`.

        Syncs: no.

        Example:
            >>> s = NoScaler(); s.update(torch.tensor(1.0)); int(s.skipped_steps)
            1
        """
        skipped = (_as_flag(found_inf, self.device) != 0).to(self._skipped.dtype)
        self._skipped += skipped
        self._in_a_row = (self._in_a_row + 1) * skipped
        self._in_a_row_read = None

    def observe(self, found_inf: bool, loss_scale: float, in_a_row: int | None = None) -> None:
        """Host-side bookkeeping with values already read on the host (by `mp.step`'s one sync).

        ``in_a_row`` is `skipped_in_a_row` after this step, when the caller read it (so reading the
        property later costs no sync). `DynamicScaler` also warns once (or raises) at its floor.

        Syncs: no.
        """
        if in_a_row is not None:
            self._in_a_row_read = in_a_row

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
    def scale_tensor(self) -> torch.Tensor:
        """The current loss scale as a 0-dim float32 tensor on the scaler's device. Syncs: no."""
        return self._scale

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many steps `update` has seen with inf/NaN gradients: 0-dim int64 tensor. Syncs: no."""
        return self._skipped

    @property
    def skipped_in_a_row_tensor(self) -> torch.Tensor:
        """Consecutive skipped steps up to the last `update` (0 after a clean one): 0-dim int64. Syncs: no."""
        return self._in_a_row

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
        if self._in_a_row_read is None:
            self._in_a_row_read = int(self._in_a_row.item())
        return self._in_a_row_read

    @property
    def known_skipped_in_a_row(self) -> int | None:
        """`skipped_in_a_row` as last read on the host, or None when it may have changed since. Syncs: no."""
        return self._in_a_row_read

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"_scale": self._scale, "_skipped": self._skipped, "_in_a_row": self._in_a_row}

    def to(self, device: torch.device | str) -> LossScaler:
        """Move the scaler's state to ``device`` (the training device); returns self.

        Example:
            >>> NoScaler().to("cpu").device
            device(type='cpu')
        """
        self.device = torch.device(device)
        for name, tensor in self._state_tensors().items():
            setattr(self, name, tensor.to(self.device))
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

        Syncs: yes.

        Example:
            >>> StaticScaler(8.0).state_dict()["scale"]
            8.0
        """
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "scale": self.loss_scale,
            "skipped_steps": int(self._skipped.item()),
            "skipped_in_a_row": self.skipped_in_a_row,
            **self._config()}

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
        if state_dict.get("kind") != self.kind:
            raise ValueError(
                f"this state dict is for {state_dict.get('kind')!r}, not {self.kind!r}: load it into a "
                f"{state_dict.get('kind')} (or create the scaler that wrote it)")
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"scaler state dict version {state_dict.get('version')!r} is not supported; this mixprec "
                f"reads version {STATE_VERSION}")
        # Dicts written before the run of skips was saved restart it from 0.
        if set(state_dict) | {"skipped_in_a_row"} != expected:
            missing = sorted(expected - set(state_dict) - {"skipped_in_a_row"})
            extra = sorted(set(state_dict) - expected)
            raise ValueError(
                f"{self.kind} state dict has missing keys {missing} and unexpected keys {extra}; "
                f"expected exactly {sorted(expected)}")
        self._load_config(state_dict)
        self._scale = torch.tensor(float(state_dict["scale"]), dtype=torch.float32, device=self.device)
        self._skipped = torch.tensor(_count(state_dict, "skipped_steps"), dtype=torch.int64, device=self.device)
        self._in_a_row_read = _count(state_dict, "skipped_in_a_row") if "skipped_in_a_row" in state_dict else 0
        self._in_a_row = torch.tensor(self._in_a_row_read, dtype=torch.int64, device=self.device)

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
        options = dict(growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=growth_interval,
                       hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale)
        _validate_dynamic(init_scale, **options)
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

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super()._state_tensors(),
            "_growth_tracker": self._growth_tracker,
            "_hysteresis_tracker": self._hysteresis_tracker}

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off or grow the scale after one step (see the class docstring). Syncs: no.

        Example:
            >>> s = DynamicScaler(init_scale=8.0, hysteresis=2)
            >>> s.update(torch.tensor(1.0)); s.loss_scale  # first overflow: hysteresis absorbs it
            8.0
            >>> s.update(torch.tensor(1.0)); s.loss_scale
            4.0
        """
        super().update(found_inf)
        overflow = _as_flag(found_inf, self.device) != 0
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
            f"({int(self._skipped.item())} skipped so far). Something other than the loss scale produces "
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
        _validate_dynamic(state_dict["scale"], **{k: v for k, v in options.items() if k != "raise_at_min_scale"})
        self._set_options(**options)
        self._warned_at_floor = bool(state_dict["warned_at_floor"])
        as_int32 = {"dtype": torch.int32, "device": self.device}
        self._growth_tracker = torch.tensor(_count(state_dict, "growth_tracker"), **as_int32)
        self._hysteresis_tracker = torch.tensor(_count(state_dict, "hysteresis_tracker"), **as_int32)


# ----- argument checks ----------------------------------------------------------------------------


def _count(state_dict: dict[str, Any], key: str) -> int:
    """A state dict's counter: an integer >= 0 (a tensor holding one is fine), else a ValueError naming it."""
    value = state_dict[key]
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"scaler state dict: {key} must be an integer >= 0, got {value!r}")
    return number


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


def _validate_dynamic(init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any,
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


# ----- the scaler a policy's `scaling` text names ---------------------------------------------------------


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
