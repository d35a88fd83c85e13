"""Native execution of a policy: torch dtypes and torch.autocast.

* Parameters are cast to their storage dtype by assigning ``p.data`` (the Parameter objects stay the
  same, so an optimizer built over them before prepare still holds the model's parameters).
* Activations: one torch.autocast for the policy's compute dtype around the forward. torch.autocast
  already runs softmax, log_softmax and the losses in FP32 (its fp32 op list): op-level FP32.
* A module whose compute format differs from its parent's (an FP32 island such as a LayerNorm, or a
  rule) gets a nested autocast (disabled for FP32) for its forward, its floating inputs cast to its
  compute dtype, and its floating outputs cast back to the activation dtype.
* The model's floating outputs are cast to the policy's output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import F32, Format
from ..policy import ModulePrecision
from .hooks import eager, gated, map_floats


def dtype_of(fmt: Format) -> torch.dtype:
    dtype = fmt.torch_dtype
    if dtype is None:  # resolve_execution refuses such policies; this is a guard for direct callers
        raise ValueError(f"format {fmt.name} has no torch dtype: it can only be emulated")
    return dtype


def cast_parameters_(model: torch.nn.Module, params: Iterable[tuple[torch.nn.Parameter, Format]]) -> None:
    """Cast each parameter (and its grad, if any) to its storage dtype, keeping the Parameter object."""
    with torch.no_grad():
        for p, fmt in params:
            dtype = dtype_of(fmt)
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
                if p.grad is not None:
                    p.grad = p.grad.to(dtype)
    flatten_rnns(model)


def flatten_rnns(model: torch.nn.Module) -> None:
    """cuDNN wants an RNN's weights in one buffer of one dtype: re-flatten after their storage changed."""
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters()


def add_forward_casts(model: torch.nn.Module, precisions: list[ModulePrecision], activation: Format,
                      output: Format, device_type: str, dtype_of: Callable[[Format], torch.dtype] = dtype_of,
                      gate: Callable[[], bool] | None = None) -> list[RemovableHandle]:
    """Hooks for the modules whose compute format differs from their parent's, and for the outputs.

    `dtype_of` maps a format to the dtype that holds it (per-op emulation passes its carriers); the
    hooks act only while `gate` returns True (see `mixprec.execution.hooks.gated`)."""
    handles: list[RemovableHandle] = []
    by_name = dict(model.named_modules())
    compute_of = {mp.name: mp.compute for mp in precisions}
    for mp in precisions:
        parent = compute_of[mp.name.rpartition(".")[0]] if mp.name else activation
        module = by_name[mp.name]
        if mp.compute == parent:
            if isinstance(module, torch.nn.RNNBase) and mp.compute != F32 and mp.params == mp.compute:
                # Autocast leaves an RNN's float32 inputs (x, h0) as they are, and 16-bit weights with
                # float32 inputs fail on CPU (oneDNN): give the RNN its inputs in its weights' dtype.
                handles.append(module.register_forward_pre_hook(gated(_inputs_to_hook(dtype_of(mp.compute)), gate),
                                                                with_kwargs=True))
            continue
        contexts: list[torch.autocast] = []  # a stack: a module may be re-entered
        handles.append(module.register_forward_pre_hook(
            gated(_enter_hook(dtype_of(mp.compute), device_type, contexts), gate), with_kwargs=True))
        # Left by the same calls it entered (checked here: the gate may read differently inside the module).
        handles.append(module.register_forward_hook(
            gated(_exit_hook(dtype_of(activation), contexts), gate and _entered(contexts)), always_call=True))
    handles.append(model.register_forward_hook(gated(_cast_outputs_hook(dtype_of(output)), gate)))
    return handles


def _entered(contexts: list[torch.autocast]) -> Callable[[], bool]:
    """A gate that is open while `contexts` holds an autocast the enter hook opened."""
    return lambda: bool(contexts)


def _enter_hook(dtype: torch.dtype, device_type: str, contexts: list[torch.autocast]) -> Callable:
    lower = dtype != torch.float32

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = torch.autocast(device_type, dtype=dtype if lower else None, enabled=lower)
        context.__enter__()
        contexts.append(context)
        inputs: tuple[tuple, dict] = _inputs_to_hook(dtype)(module, args, kwargs)
        return inputs

    return eager(hook)


def _exit_hook(dtype: torch.dtype, contexts: list[torch.autocast]) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not contexts:  # the enter hook did not run (an earlier pre-hook raised)
            return None
        contexts.pop().__exit__(None, None, None)
        return None if output is None else map_floats(output, lambda y: y.to(dtype))

    return eager(hook)


def _inputs_to_hook(dtype: torch.dtype) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return map_floats(args, lambda x: x.to(dtype)), map_floats(kwargs, lambda x: x.to(dtype))

    return eager(hook)


def _cast_outputs_hook(dtype: torch.dtype) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return map_floats(output, lambda y: y.to(dtype))

    return eager(hook)
