"""Loss scalers: multiply the loss by S before backward, unscale the gradients by 1/S before the update.

Small gradients (the paper's SSD run: activation gradients in [2^-27, 2^-24)) flush to zero in FP16.
Multiplying the loss by S shifts every gradient up by log2(S) binades so they survive; the weight
gradients are multiplied by 1/S in FP32 before clipping, weight decay and the optimizer step.

Files: ``scalers.py`` (the interface, NoScaler, StaticScaler), ``dynamic.py``, ``checks.py`` (the
numbers a scale may take), ``named.py`` (the scaler a policy's ``scaling`` text names). The fused
unscale-and-check pass is in `mixprec.nonfinite`.

Three scalers share one interface (`LossScaler`):

* `NoScaler`: S = 1. Still checks gradients for inf/NaN so that `mp.step` skips a poisoned step.
* `StaticScaler(S)`: a fixed S; a step whose gradients overflow is skipped.
* `DynamicScaler`: S backs off on overflow (after `hysteresis` overflows) and grows after
  `growth_interval` clean steps, clamped to ``[min_scale, max_scale]``.

All state (scale, trackers, and the skipped-step counters of the step's record, `mixprec.skips`, which
a scaler carries so that its checkpoint holds them) lives in 0-dim tensors on the scaler's device and
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

from ..nonfinite import find_nonfinite, group_by_device_and_dtype, unscale_and_check_
from .checks import LARGEST_SCALE, SCALE_RANGE, SMALLEST_SCALE, check_loss_scale
from .dynamic import DynamicScaler, LossScaleFloorError
from .named import make_scaler, parse_scaling
from .scalers import STATE_VERSION, STORM_SKIPS, LossScaler, NoScaler, StaticScaler

__all__ = ["LossScaler", "NoScaler", "StaticScaler", "DynamicScaler", "LossScaleFloorError", "unscale_and_check_",
           "find_nonfinite", "group_by_device_and_dtype", "check_loss_scale", "parse_scaling", "make_scaler",
           "SMALLEST_SCALE", "LARGEST_SCALE", "SCALE_RANGE", "STATE_VERSION", "STORM_SKIPS"]
