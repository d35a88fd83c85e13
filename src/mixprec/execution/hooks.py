"""The hook toolkit every execution mode shares (`native`, `emulated`, `emulated_module`).

* `eager` / `gated`: hooks that run outside torch.compile's tracing and act only while a gate is open
  (inside `mp.autocast`, or while activation checkpointing recomputes a forward);
* `cast` / `round_chain`: round a tensor onto a chain of formats, its gradient onto another chain;
* `map_floats`: apply a function to every floating tensor inside nested outputs;
* `round_parameters_` / `add_gradient_rounding`: emulated parameters hold values on their storage
  format's grid, and so do their gradients after every accumulation;
* `add_parameter_swap`: put a cast of each parameter in its place while a module runs forward.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import F32, Format
from ..gradients import rounding_hook
from ..quantize import quantize


def eager(hook: Callable) -> Callable:
    """Run `hook` outside torch.compile's tracing: it rounds with Format objects and swaps module
    parameters, which dynamo cannot trace; a compiled model breaks its graph around each such hook."""
    disabled: Callable = torch.compiler.disable(hook, recursive=True)
    return disabled


def gated(hook: Callable, gate: Callable[[], bool] | None) -> Callable:
    """`hook`, run only while ``gate()`` is true (always with None); see `Gated`."""
    return hook if gate is None else Gated(hook, gate)


class Gated:
    """A hook that runs `hook` only while ``gate()`` is true. The gate is checked before the hook's
    compile-disabled body: a gated hook that does nothing costs a compiled model no graph break.

    A copy of its module (``torch.save(model)``, ``copy.deepcopy``) gets a hook that does nothing: the
    state it gates on belongs to the original model.
    """

    def __init__(self, hook: Callable, gate: Callable[[], bool]) -> None:
        self.hook, self.gate = hook, gate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hook(*args, **kwargs) if self.gate() else None

    def __reduce__(self) -> tuple:
        return functools.partial, (_nothing,)


def _nothing(*args: Any, **kwargs: Any) -> None:
    """What a `Gated` hook becomes in a copy of its model."""


def round_chain(x: torch.Tensor, formats: tuple[Format, ...]) -> torch.Tensor:
    """Round `x` onto each format in turn (FP32 skipped); no autograd."""
    for fmt in formats:
        if fmt != F32:
            x = quantize(x, fmt)
    return x


class _Round(torch.autograd.Function):
    """Forward: round onto `forward_formats`. Backward: round the gradient onto `backward_formats`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_formats: tuple, backward_formats: tuple) -> torch.Tensor:
        ctx.backward_formats = backward_formats
        return round_chain(x, forward_formats) if forward_formats else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return round_chain(grad, ctx.backward_formats), None, None


def cast(x: torch.Tensor, forward_formats: tuple[Format, ...], backward_formats: tuple[Format, ...]) -> torch.Tensor:
    """An emulated cast: values rounded in forward, the gradient rounded in backward."""
    forward_formats = tuple(f for f in forward_formats if f != F32)
    backward_formats = tuple(f for f in backward_formats if f != F32)
    if not x.requires_grad or not torch.is_grad_enabled():
        return round_chain(x, forward_formats) if forward_formats else x
    if not forward_formats and not backward_formats:
        return x
    rounded: torch.Tensor = _Round.apply(x, forward_formats, backward_formats)
    return rounded


def map_floats(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every floating tensor in nested tuples, lists, namedtuples and dicts (ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple, PackedSequence
        return type(obj)(*(map_floats(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_floats(o, fn) for o in obj)
    if type(obj) is dict:  # a plain dict (kwargs): built anew, which torch.compile can trace
        return {key: map_floats(value, fn) for key, value in obj.items()}
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps the mapping's type (OrderedDict, transformers' ModelOutput)
        for key, value in obj.items():
            new[key] = map_floats(value, fn)
        return new
    return obj


def round_parameters_(params: Iterable[tuple[torch.nn.Parameter, Format]]) -> None:
    """Round each parameter in place onto its storage format's grid (same Parameter objects)."""
    with torch.no_grad():
        for p, fmt in params:
            if fmt != F32:
                p.copy_(quantize(p, fmt))


def add_gradient_rounding(params: Iterable[tuple[torch.nn.Parameter, Format]]) -> list[RemovableHandle]:
    """After each accumulation into p.grad, round p.grad onto p's storage format (kept while prepared)."""
    return [p.register_post_accumulate_grad_hook(rounding_hook(fmt)) for p, fmt in params if fmt != F32]


def add_parameter_swap(module: torch.nn.Module, make: Callable[[torch.Tensor], torch.Tensor],
                       storage: dict[int, Format], gate: Callable[[], bool] | None = None,
                       owners: list[torch.nn.Module] | None = None) -> list[RemovableHandle]:
    """Hooks putting ``make(p)`` in place of each parameter of `owners` (default: `module` alone) while
    `module` runs forward (gated by `gate`); a parameter an enclosing module's swap already replaced is
    left as that swap made it.

    Writes owner._parameters[name] directly (keeping the key's order: state_dict and named_parameters
    are unchanged) because nn.Module's setattr refuses a non-Parameter tensor; the replacement's backward
    flows into the original Parameter. What the forward writes into a replacement in place (nn.Embedding's
    max_norm renormalises its weight) natively lands in the parameter: it is copied back into it, rounded
    onto its storage format (`storage`, by id); not under torch.inference_mode (no version counter tells).
    """
    owners = [module] if owners is None else owners
    swapped: list[tuple[list, list]] = []  # a stack: a module may be re-entered

    def swap(module: torch.nn.Module, args: tuple) -> None:
        done, flat = [], []
        for owner in owners:
            params: dict[str, Any] = owner._parameters  # a plain tensor stands in for the Parameter here
            for name, p in owner._parameters.items():
                if isinstance(p, torch.nn.Parameter) and (new := make(p)) is not p:
                    params[name] = new
                    done.append((owner, name, p, new, None if new.is_inference() else new._version))
            if isinstance(owner, torch.nn.RNNBase):
                # RNNs read a cached list of their weights (refreshed by their own setattr, which we bypass).
                flat.append((owner, owner._flat_weights))
                owner._flat_weights = [owner._parameters.get(n) for n in owner._flat_weights_names]
        swapped.append((done, flat))

    def restore(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not swapped:  # the swap hook did not run (an earlier pre-hook raised)
            return
        done, flat = swapped.pop()
        for owner, name, p, new, version in done:
            owner._parameters[name] = p
            if version is not None and new._version != version:
                with torch.no_grad():
                    p.copy_(round_chain(new, (storage.get(id(p), F32),)))
        for owner, weights in flat:
            owner._flat_weights = weights

    # The restore acts exactly where a swap did (the gate may read otherwise by then).
    return [module.register_forward_pre_hook(gated(eager(swap), gate)),
            module.register_forward_hook(gated(eager(restore), gate and (lambda: bool(swapped))), always_call=True)]
