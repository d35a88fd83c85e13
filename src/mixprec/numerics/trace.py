"""Where did the first inf or NaN come from? Re-run a failing step's forward and backward, recorded.

`trace_nonfinite(model, run, loss_scale=...)` runs ``run()`` (the step's forward, returning the loss)
under a recording `TorchFunctionMode`, then the backward of ``loss * loss_scale`` with
``torch.autograd.grad``, and names the op (and the module running it) where values first became
non-finite:

* **Forward**: every torch call with floating outputs is an op, numbered in call order (``op_index``);
  its output's inf/NaN counts are taken on the device as it runs (one host sync at the end). If the
  loss is non-finite, the trace follows the non-finite inputs back from the op that made the loss to
  an op whose inputs were all finite (the origin), or to a parameter or input that already held
  non-finite values. Non-finite values that never reach the loss (``-inf`` in an attention mask
  that softmax absorbs) are not reported.
* **Backward** (when the loss is finite): a hook on every autograd node of the step's graph sees the
  gradients the node received and those it produced; the culprit is the first node to run whose
  received gradients were finite and whose produced ones were not. Each node is mapped to the op that
  created it in forward, so the answer is an op: the matmul whose backward overflowed, with the
  parameter it wrote the non-finite gradient for when there is one.

Granularity. An op is a call at the outermost overridable level: ``F.linear``, ``F.layer_norm``,
``torch.matmul``, ``Tensor.to``. Autograd nodes created inside one op (autocast's casts, per-op
emulation's FP32 arithmetic, the nodes of a composite function) belong to that op, so in backward an
op's FP32 -> FP16 gradient cast counts as that op. A custom ``torch.autograd.Function`` is not seen
by a `TorchFunctionMode` (torch 2.x dispatches the ops *inside* its forward, not ``apply``); its
backward node is found in the graph and reported by node name (``"MyFnBackward"``, no op index) with
the module that was running when it was created. Modules are the innermost module running, by
forward pre/post hooks on every submodule (``None``: outside the model, e.g. the loss function).

Works under `mixprec.autocast` (native, per-op emulated, module-boundary emulated), whether ``run``
opens it or the trace runs inside one: the recording mode is pushed again inside the model's forward,
so that per-op emulation's own mode sits outside it and an emulated matmul is seen as one matmul.
A prepared model's forward run outside `mixprec.autocast` is not the step (it computes without the
policy's formats; emulated, in FP32): finding nothing then raises RuntimeError, finding something warns.

The model is left as it was: parameters, buffers (BatchNorm statistics), every ``.grad`` (and the
FP32 master gradients of `mixprec.MasterWeights`, whose hooks run when autograd computes a parameter's
gradient) and torch's random state are restored; hooks and modes are removed, also when ``run``
raises. Other tensor hooks registered on parameters run, as in any ``torch.autograd.grad`` call.
Dropout draws different masks than the failing step unless ``run`` seeds them itself.

FP8 layers (a model prepared with an FP8 policy): the replay's FP8 casts are counted on the device, and
the trace names those that saturated (`Trace.fp8_saturated`: ``"layer (role)"``: finite values the cast
clamped to the format's max), beside the op it blames. Delayed scaling's state (histories, pending
amaxes) is restored after the replay, so the amaxes it recorded are not pushed by the next `mp.step`.
Its scales are those of the histories as the trace finds them: after `mp.step` pushed the failing
step's finite amaxes, they can be larger than the ones the step used.

Cost: a re-run of one step with a small reduction per op output, holding the step's op outputs
until it returns (about the activations training keeps).

This file runs the trace; `trace_result` holds `Trace`, `trace_recording` the forward's recording
(ops, modules, autograd nodes' sites) and `trace_culprits` the search for the culprit in either phase.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import F32
from ..state import prepared_state
from .fp8_casts import Fp8Observers
from .trace_culprits import backward_culprit, forward_culprit
from .trace_recording import Recorder, RecordingMode, add_module_hooks
from .trace_result import Trace

__all__ = ["Trace", "trace_nonfinite"]


def trace_nonfinite(model: torch.nn.Module, run: Callable[[], torch.Tensor], *,
                    loss_scale: float | torch.Tensor = 1.0) -> Trace | None:
    """Re-run a failing step and name the op and module where values first became inf or NaN.

    Args:
        model: the model ``run`` calls (plain, or prepared with `mixprec.prepare`).
        run: a zero-argument callable doing the step's forward and returning the loss, e.g.
            ``lambda: loss_fn(model(x), y)``. For a prepared model the forward must run under
            ``mp.autocast(model)``, as the step's did: ``run`` may open it itself, or the trace may be
            called inside one.
        loss_scale: the loss scale the failing step used (``info.loss_scale`` from `mixprec.step`, a
            float, or a 0-dim tensor after ``sync=False``);
            the backward runs on ``loss * loss_scale``, so an overflow the scale caused is found.

    Returns:
        A `Trace` naming the first non-finite op (forward if the loss was non-finite, else backward),
        or None if the loss and every gradient were finite.

    Raises:
        RuntimeError: `model` is prepared (with 16-bit or 8-bit compute), ``run`` called its forward
            outside ``mp.autocast(model)``, and nothing was found: that replay computed without the
            policy's formats (emulated: in FP32), so it cannot have reproduced the step. When something
            was found that way, a RuntimeWarning says so and the trace is returned.
        ValueError: ``loss_scale`` is not a positive number.
        TypeError: ``run`` did not return a floating tensor.
        Whatever ``run`` raises (after everything the trace changed is restored).

    Leaves the model as it was (parameters, buffers, ``.grad``, master gradients) and torch's random
    state untouched. Syncs: yes (it is a debugging tool: a few host syncs at the end of each phase).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> x = torch.full((2, 4), 10.0)
        >>> print(trace_nonfinite(model, lambda: model(x).sum()))
        None
        >>> print(trace_nonfinite(model, lambda: model(x).sqrt().sum()))
        forward: first non-finite output at op 2 'sqrt' outside the model (float32 -> float32; 0 inf, 2 nan)
        >>> trace = trace_nonfinite(model, lambda: model(x).sum(), loss_scale=1e38)
        >>> trace.phase, trace.module, trace.op, trace.parameter
        ('backward', '1', 'linear', '1.weight')
    """
    _check_arguments(model, run)
    scale = _positive_scale(loss_scale)
    state = prepared_state(model)
    casts = Fp8Observers(state.fp8_layers.values(), replay=True) if state is not None and state.fp8_layers else None
    try:
        trace = _traced(model, run, scale)
    finally:
        if casts is not None:
            casts.remove()  # the layers' observers and delayed-scaling state as they were
    if trace is not None and casts is not None:
        trace = replace(trace, fp8_saturated=tuple(casts.saturated()))
    return trace


def _traced(model: torch.nn.Module, run: Callable[[], torch.Tensor], loss_scale: float) -> Trace | None:
    """The trace itself (see `trace_nonfinite`)."""
    rec = Recorder(model)
    handles: list[RemovableHandle] = []
    inner: list[RecordingMode] = []
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        try:
            add_module_hooks(model, rec, handles, inner)
            with RecordingMode(rec):
                loss = run()
            for handle in handles:  # the backward needs none of them
                handle.remove()
            _check_loss(loss)
            if not torch.isfinite(loss).all():
                return _checked_replay(rec, forward_culprit(rec, loss))
            if loss.grad_fn is None:
                return _checked_replay(rec, None)
            return _checked_replay(rec, backward_culprit(rec, loss, loss_scale))
        finally:
            while inner:  # left open only if a forward hook could not run
                inner.pop().__exit__(None, None, None)
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for b, saved in buffers:  # BatchNorm's running statistics, its batch counter
                    if not torch.equal(b, saved):  # (also when NaN is in both: copying is harmless)
                        b.copy_(saved)


def _checked_replay(rec: Recorder, trace: Trace | None) -> Trace | None:
    """`trace`, once it is clear the replay ran as the step did.

    A prepared model whose forward ran outside its `mp.autocast` computed without the policy's formats
    (emulated: in FP32 throughout), so the replay is not the step. Finding nothing then says nothing
    about the step: RuntimeError. Finding something is still a fact about that run (its values went
    non-finite even so), but maybe not where the step's did: RuntimeWarning, and the trace.
    """
    state = rec.prepared
    if state is None or not rec.forwards_outside_autocast or all(p.compute == F32 for p in state.precisions):
        return trace
    what = (f"the model is prepared with policy '{state.policy}' ({state.mode}), but run() called its forward "
            f"outside mp.autocast(model), where the policy's compute formats do not apply (emulated "
            f"execution computes in FP32 there), so the replay did not compute as the step did")
    fix = ("Replay the step under the policy: `with mp.autocast(model): trace = mp.trace_nonfinite(model, "
           "lambda: loss_fn(model(x), y), loss_scale=info.loss_scale)`, or open mp.autocast(model) inside run")
    if trace is None:
        raise RuntimeError(f"trace_nonfinite found no inf or NaN, and cannot have reproduced the step: {what}. {fix}.")
    warnings.warn(f"trace_nonfinite: {what}; the trace shows where that run went non-finite, which may not be "
                  f"where the step did. {fix}.", RuntimeWarning, stacklevel=4)
    return trace


def _check_arguments(model: torch.nn.Module, run: Callable[[], torch.Tensor]) -> None:
    """TypeError unless `model` is a module and `run` a callable."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace_nonfinite takes the model (a torch.nn.Module), got {type(model).__name__}")
    if not callable(run):
        raise TypeError(f"run must be a zero-argument callable returning the loss, got {type(run).__name__}")


def _positive_scale(loss_scale: float | torch.Tensor) -> float:
    """`loss_scale` (a number, or a 0-dim tensor: ``info.loss_scale`` of a ``sync=False`` step) as a
    float; ValueError unless it is a positive number."""
    try:
        scale = float(loss_scale)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"loss_scale must be a positive number, got {loss_scale!r}") from None
    if not scale > 0:
        raise ValueError(f"loss_scale must be a positive number (the step's info.loss_scale), got {loss_scale!r}")
    return scale


def _check_loss(loss: object) -> None:
    """TypeError unless what ``run`` returned is a floating tensor."""
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(f"run must return the loss as a floating tensor, got "
                        f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else loss.dtype}")
