"""Native execution of a policy: torch dtypes and torch.autocast.

* Parameters are cast to their storage dtype by assigning ``p.data`` (the Parameter objects stay the
  same, so an optimizer built over them before prepare still holds the model's parameters).
* Activations: one torch.autocast for the policy's compute dtype around the forward. torch.autocast
  already runs softmax, log_softmax and the losses in FP32 (its fp32 op list): op-level FP32.
* A module whose compute format differs from its parent's (an FP32 island such as a LayerNorm, or a
  rule) gets a nested autocast (disabled for FP32) for its forward, its floating inputs cast to its
  compute dtype, and its floating outputs cast back to the activation dtype.
* A parameter stored in another dtype than its module computes with (16-bit weights in an FP32 module:
  ``params=f16`` or a rule ``lm_head:fp32/fp16``) is given to the module cast to that dtype while it runs
  forward: the same value, the compute format's arithmetic (`parameter_dtypes`). Per-op emulation uses
  the same rule with carrier dtypes, so its FP32 tensors holding 16-bit values are cast where needed.
* The model's floating outputs are cast to the policy's output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import F32, Format
from ..policy import ModulePrecision
from ..precisions import parameter_formats
from .hooks import add_parameter_swap, eager, gated, map_floats


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
    """Hooks for the modules whose compute format differs from their parent's, for the parameters stored
    in another dtype than their module computes with (`add_parameter_casts`), and for the outputs.

    `dtype_of` maps a format to the dtype that holds it (per-op emulation passes its carriers); the
    hooks act only while `gate` returns True (see `mixprec.execution.hooks.gated`)."""
    handles = add_parameter_casts(model, precisions, dtype_of, gate)
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


def parameter_dtypes(model: torch.nn.Module, precisions: list[ModulePrecision],
                     dtype_of: Callable[[Format], torch.dtype] = dtype_of,
                     storage: dict[int, Format] | None = None) -> dict[int, torch.dtype]:
    """The dtype each parameter stored narrower than FP32 is used in, by id, for those whose tensor is in
    another dtype: that of its module's compute format (FP32 for an FP32 module: a 16-bit weight cast up);
    for a module keeping running statistics (BatchNorm), their dtype (FP32): torch's batch norm takes
    16-bit inputs with weights in its statistics' dtype, as cuDNN does (apex's keep_batchnorm_fp32). A
    weight that its owners (tied embeddings) would use in different dtypes is used in FP32. `storage`: each
    parameter's storage format by id (default: worked out from `precisions`).

    Example:
        >>> import mixprec as mp
        >>> m = torch.nn.Linear(2, 2)
        >>> _ = mp.prepare(m, None, mp.Policy.parse("params=f16").replace(execution="native"))
        >>> set(parameter_dtypes(m, mp.Policy.parse("params=f16").module_precisions(m)).values())
        {torch.float32}
    """
    if storage is None:
        storage = {id(p): fmt for p, fmt in parameter_formats(model, precisions).values()}
    by_name = dict(model.named_modules())
    wanted: dict[int, tuple[torch.Tensor, set[torch.dtype]]] = {}
    for mp in precisions:
        module = by_name[mp.name]
        stats = getattr(module, "running_mean", None)
        if isinstance(stats, torch.Tensor) and stats.is_floating_point():
            dtype = stats.dtype
        else:
            dtype = torch.float32 if mp.compute == F32 else dtype_of(mp.compute)
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and storage.get(id(p), F32) != F32:
                wanted.setdefault(id(p), (p, set()))[1].add(dtype)
    used = {key: dtypes.pop() if len(dtypes) == 1 else torch.float32 for key, (_, dtypes) in wanted.items()}
    return {key: dtype for key, dtype in used.items() if wanted[key][0].dtype != dtype}


def add_parameter_casts(model: torch.nn.Module, precisions: list[ModulePrecision],
                        dtype_of: Callable[[Format], torch.dtype] = dtype_of,
                        gate: Callable[[], bool] | None = None) -> list[RemovableHandle]:
    """While each module runs forward, the parameters of it *and of every module inside it* that
    `parameter_dtypes` names are replaced by a cast to that dtype (differentiable: the gradient comes back
    in the parameter's dtype); gated by `gate`. A parent reading a child's weight itself (nanoGPT's
    ``x + self.wpe.weight[:T]``) so gets the tensor the child computes with, and per-op emulation's 16-bit
    weights add in 16 bits (overflowing at 65504) as natively stored ones do. Syncs: no."""
    storage = {id(p): fmt for p, fmt in parameter_formats(model, precisions).values()}
    dtypes = parameter_dtypes(model, precisions, dtype_of, storage)
    if not dtypes:
        return []

    def make(p: torch.Tensor) -> torch.Tensor:
        return p.to(dtypes[id(p)]) if id(p) in dtypes else p

    handles: list[RemovableHandle] = []
    for module in model.modules():
        owners = [m for m in module.modules() if any(id(p) in dtypes for p in m._parameters.values())]
        if owners:  # the outermost module's swap does the work; inner ones act when run on their own
            handles += add_parameter_swap(module, make, storage, gate, owners)
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
