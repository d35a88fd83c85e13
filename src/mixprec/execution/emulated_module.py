"""Module-boundary emulation (``execution=emulated-module``): the fallback for formats no 16-bit dtype carries.

Values are rounded onto a format's grid, arithmetic runs in FP32.

The model mirrors what native execution stores, module by module (see docs/policies.md):

* parameters hold values on their storage format's grid (rounded at prepare), and their gradients
  are rounded onto it after every accumulation (natively a float16 parameter has a float16 .grad);
* every floating tensor crossing a module boundary (inputs of modules that compute, outputs of every
  module) is stored in the policy's activation format, and rounded onto the module's compute format
  on the way in; the gradient of each such tensor is rounded the same way in backward;
* a module whose parameters are wider than its compute format (FP32 params, FP16 compute: torch.amp's
  recipe) sees its weights rounded onto the compute format at use, and the weight gradient of that use
  is rounded onto the compute format too (natively: the gradient of the float16 copy of the weight).

Functional ops inside a module's forward (an attention's softmax, a residual add) run in FP32 between
those boundaries: the emulation is per module, not per op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import F32, Format
from ..policy import ModulePrecision
from .hooks import add_parameter_swap, cast, eager, gated, map_floats


def add_forward_rounding(model: torch.nn.Module, precisions: list[ModulePrecision], storage: dict[int, Format],
                         activation: Format, output: Format,
                         gate: Callable[[], bool] | None = None) -> list[RemovableHandle]:
    """Forward hooks that round module inputs, weights at use and outputs (active inside autocast).

    `storage` maps id(parameter) to its storage format; `activation` is the format tensors are stored
    in between modules (the policy's compute format); `output` the format of the model's outputs;
    `gate`: the hooks act only while it returns True (see `gated`).
    """
    handles: list[RemovableHandle] = []
    by_name = dict(model.named_modules())
    for mp in precisions:
        module = by_name[mp.name]
        compute = mp.compute
        computes_here = mp.has_params or not any(True for _ in module.children())
        if computes_here:
            handles.append(module.register_forward_pre_hook(
                gated(_input_hook(activation, compute), gate), with_kwargs=True))
            stored = {storage[id(p)] for p in module._parameters.values() if p is not None}
            if compute != F32 and stored - {compute}:  # some weight is wider than the compute format
                handles += add_parameter_swap(module, _cast_onto(compute), storage, gate)
        handles.append(module.register_forward_hook(gated(_output_hook((compute, activation)), gate)))
    # The model's outputs: what the loss sees. Natively a cast to `output`, whose backward casts back.
    handles.append(model.register_forward_hook(gated(_output_hook((output,)), gate)))
    return handles


def _input_hook(activation: Format, compute: Format) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            return cast(x, (activation, compute), (compute, activation))

        return map_floats(args, fn), map_floats(kwargs, fn)

    return eager(hook)


def _output_hook(formats: tuple[Format, ...]) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return map_floats(output, lambda y: cast(y, formats, tuple(reversed(formats))))

    return eager(hook)


def _cast_onto(fmt: Format) -> Callable[[torch.Tensor], torch.Tensor]:
    """A parameter swap's `make`: the parameter rounded onto `fmt` at use (and its gradient on the way back)."""
    return lambda p: cast(p, (fmt,), (fmt,))
