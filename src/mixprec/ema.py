"""Averaged weights (EMA, SWA) of a prepared model: `AveragedModel`, torch's class averaging in FP32.

``torch.optim.swa_utils.AveragedModel`` averages ``model.parameters()``. For a prepared model those are
the stored 16-bit weights (float16 tensors natively, FP32 values on the FP16 grid when emulated), not
the FP32 masters the optimizer steps, and two things go wrong:

* built before ``mp.prepare`` (an FP32 copy) over a native model, its second ``update_parameters``
  raises: torch's foreach lerp refuses FP32 averages beside float16 parameters;
* built after it (a copy of the 16-bit parameters), it averages in 16 bits: with decay 0.999 an update
  moves the average by 0.1% of its distance to the weights, under half an FP16 ulp (2^-11 of the
  average) unless that distance is about half the weight itself, so the average stays where it started
  (the lost updates of the paper's Figure 2b, now in the average).

`AveragedModel` here is torch's class (same arguments, averaging functions, state dict) with two
changes: its copy holds FP32 weights (widened at construction, starting from the masters), and
``update_parameters`` reads each parameter's FP32 value, its master where it has one (where the master
still rounds to the parameter, as the step's own sync keeps it), the parameter itself otherwise.

Its copy also carries the prepared model's `PreparedState` (as a copy of the model does), so that
``mp.autocast(ema)`` runs it under the policy: inside that block its weights are what the prepared
model would store for them (rounded onto their formats), outside it the copy is a plain FP32 model.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import TypeAlias

import torch
from torch.optim import swa_utils

from .execution import native
from .formats import F32, Format
from .fp32_view import fp32_weights
from .quantize import quantize
from .state import _STATE_ATTR, PreparedState, prepared_state, unwrap

__all__ = ["AveragedModel", "stored_weights", "check_averaged"]

# torch's types for the averaging functions: (averages, current weights, number averaged so far)
AverageFn: TypeAlias = "Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]"
Tensors: TypeAlias = "tuple[torch.Tensor, ...] | list[torch.Tensor]"
MultiAverageFn: TypeAlias = "Callable[[Tensors, Tensors, torch.Tensor | int], None]"


class _Weights(torch.nn.Module):
    """What ``AveragedModel.update_parameters`` reads from a model, with FP32 values for its parameters."""

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        super().__init__()
        self.values, self.buffer_values = params, buffers

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return iter(self.values)  # type: ignore[arg-type]  # plain tensors: torch only reads them

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return iter(self.buffer_values)


class AveragedModel(swa_utils.AveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` whose averages are FP32 and taken from a prepared model's
    FP32 weights (its masters): build it before or after ``mp.prepare``, update it as torch's.

    Arguments and state dict are torch's (a checkpoint of either class loads into the other).
    ``update_parameters(model)`` averages ``fp32_weights(model)`` when `model` is prepared (else its
    parameters, as torch does), and gives the copy the model's policy, for ``mp.autocast(ema)``.
    Syncs: no.

    Example:
        >>> import mixprec as mp
        >>> from torch.optim.swa_utils import get_ema_multi_avg_fn
        >>> model = torch.nn.Linear(2, 2)
        >>> model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
        >>> ema = mp.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        >>> ema.update_parameters(model)
        >>> ema.module.weight.dtype, mp.prepared_state(ema).policy == mp.prepared_state(model).policy
        (torch.float32, True)
    """

    def __init__(self, model: torch.nn.Module, device: int | torch.device | None = None,
                 avg_fn: AverageFn | None = None, multi_avg_fn: MultiAverageFn | None = None,
                 use_buffers: bool = False) -> None:
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        self._take_fp32_weights(model)

    def _take_fp32_weights(self, model: torch.nn.Module) -> None:
        """Start the copy from the model's FP32 weights (its 16-bit copies widened to FP32)."""
        with torch.no_grad():
            for p, value in zip(self.module.parameters(), fp32_weights(model), strict=True):
                if not p.is_floating_point():
                    continue
                if p.element_size() < 4:
                    p.data = value.to(p.device, copy=True)
                else:
                    p.copy_(value)

    def update_parameters(self, model: torch.nn.Module) -> None:
        """Average the model's FP32 weights into the copy (torch's update, its averaging function)."""
        source = unwrap(model)
        state = prepared_state(source)
        if state is None:
            super().update_parameters(model)
            return
        self._take_policy(state)
        super().update_parameters(_Weights(fp32_weights(source), list(source.buffers())))

    def _take_policy(self, state: PreparedState) -> None:
        """Give the copy the prepared model's state (without masters or hooks) unless it has it already."""
        mine = getattr(self.module, _STATE_ATTR, None)
        if mine is None or mine.policy != state.policy or mine.execution != state.execution:
            setattr(self.module, _STATE_ATTR, copy.copy(state))  # __getstate__: a copy's state


def _stored(data: torch.Tensor, fmt: Format, execution: str) -> torch.Tensor:
    """`data` as a prepared model stores a parameter of format `fmt` (`data` itself if it already is)."""
    if execution == "native":
        dtype = native.dtype_of(fmt)
        return data if data.dtype == dtype else data.to(dtype)
    return quantize(data, fmt)  # a new tensor: comparing first would cost a host sync per parameter


@contextlib.contextmanager
def stored_weights(model: torch.nn.Module, state: PreparedState) -> Iterator[None]:
    """For this block, the weights of a copy of a prepared model (an EMA's FP32 averages) as the prepared
    model stores them: cast (native) or rounded (emulated) onto their formats; restored on exit. The same
    Parameter objects; natively, a copy already in its formats is left as it is. Syncs: no."""
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                fmt = state.param_formats.get(name, F32)
                if fmt != F32 and p.is_floating_point():
                    stored = _stored(p.data, fmt, state.execution)
                    if stored is not p.data:
                        swapped.append((p, p.data))
                        p.data = stored
        if swapped and state.execution == "native":
            native.flatten_rnns(model)
        yield
    finally:
        for p, data in swapped:
            p.data = data
        if swapped and state.execution == "native":
            native.flatten_rnns(model)


def check_averaged(model: torch.nn.Module, state: PreparedState | None) -> None:
    """`mp.autocast`'s checks of an ``AveragedModel``: one that carries no policy is refused with what to
    do, and torch's class averaging 16-bit copies is warned about (its average loses small updates)."""
    if not isinstance(model, swa_utils.AveragedModel):
        return
    if state is None:
        raise RuntimeError(
            "mp.autocast got an AveragedModel whose copy carries no policy: it was built from the model "
            "before mp.prepare. Build it as mp.AveragedModel(model, ...) (before or after prepare) and call "
            "ema.update_parameters(model) once the model is prepared: the copy then takes the model's policy")
    if not isinstance(model, AveragedModel) and any(
            p.is_floating_point() and p.element_size() < 4 for p in model.module.parameters()):
        warnings.warn(
            "this torch.optim.swa_utils.AveragedModel averages the prepared model's 16-bit parameters in 16 "
            "bits, which loses updates smaller than half a 16-bit ulp (decay 0.999: nearly all of them); use "
            "mp.AveragedModel(model, ...) instead: same arguments, FP32 averages of the FP32 masters",
            UserWarning, stacklevel=4)
