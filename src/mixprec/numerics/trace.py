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

The model is left as it was: parameters, buffers (BatchNorm statistics), every ``.grad`` (and the
FP32 master gradients of `mixprec.MasterWeights`, whose hooks run when autograd computes a parameter's
gradient) and torch's random state are restored; hooks and modes are removed, also when ``run``
raises. Other tensor hooks registered on parameters run, as in any ``torch.autograd.grad`` call.
Dropout draws different masks than the failing step unless ``run`` seeds them itself.

Cost: a re-run of one step with a small reduction per op output, holding the step's op outputs
until it returns (about the activations training keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from .. import master as _master

__all__ = ["Trace", "trace_nonfinite"]

# Attribute writes and metadata reads: not computations.
_SKIPPED = frozenset({"__set__", "__repr__", "__format__", "__str__", "__len__", "__bool__", "__hash__"})


@dataclass(frozen=True)
class Trace:
    """Where non-finite values first appeared in a step (see `trace_nonfinite`).

    Attributes:
        phase: ``"forward"`` or ``"backward"``.
        module: qualified name of the innermost module running when the op ran (``""``: the model's own
            forward; ``None``: outside the model, e.g. the loss computed in ``run``).
        op: the op's name (``"matmul"``, ``"linear"``, ``"to"``); in backward, for a node no recorded op
            created (a custom ``autograd.Function``), the node's name (``"MyFnBackward"``).
        op_index: the op's position among the forward's ops (calls with floating outputs, in call
            order); None for such a node, or for the loss scaling itself.
        input_dtypes: forward: the op's floating inputs; backward: the gradients the node received.
        output_dtypes: forward: the op's floating outputs; backward: the gradients it produced.
        inf: how many values were infinite (forward: in the op's outputs; backward: in the gradients
            it produced).
        nan: how many were NaN (same tensors).
        parameter: backward: the parameter whose gradient the op made non-finite, if it did; forward:
            the parameter (or buffer) that already held non-finite values when the op read it.
        inputs_finite: False when the op read non-finite values that no recorded op had made (a
            parameter, a buffer, the model's input): the values were bad before the step began.

    Example:
        >>> print(Trace("forward", "h.0.attn", "matmul", 17, ("float16",), ("float16",), 12, 0))
        forward: first non-finite output at op 17 'matmul' in module 'h.0.attn' (float16 -> float16; 12 inf, 0 nan)
    """

    phase: str
    module: str | None
    op: str
    op_index: int | None
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    inf: int
    nan: int
    parameter: str | None = None
    inputs_finite: bool = True

    def __str__(self) -> str:
        where = ("outside the model" if self.module is None else
                 "in the model's own forward" if self.module == "" else f"in module '{self.module}'")
        what = f"op {self.op_index} '{self.op}'" if self.op_index is not None else f"autograd node '{self.op}'"
        dtypes = f"{', '.join(self.input_dtypes) or '-'} -> {', '.join(self.output_dtypes) or '-'}"
        counts = f"({dtypes}; {self.inf} inf, {self.nan} nan)"
        if self.phase == "forward":
            if self.inputs_finite:
                return f"forward: first non-finite output at {what} {where} {counts}"
            source = f"parameter '{self.parameter}'" if self.parameter else "its input"
            return f"forward: {what} {where} read non-finite values already in {source} {counts}"
        if self.op_index is None and self.op == "loss * loss_scale":
            return f"backward: the loss times loss_scale is already non-finite {counts}"
        into = f" into parameter '{self.parameter}'" if self.parameter else ""
        return f"backward: first non-finite gradient{into} from {what} {where} {counts}"


class _Site(NamedTuple):
    """Who created an autograd node: a recorded op (index, name) or, index None, nobody recorded."""

    op_index: int | None
    op: str
    module: str | None


class _Op(NamedTuple):
    name: str
    module: str | None
    inputs: list[tuple[str, int, int]]  # ("op", op index, output position) or ("ext", external index, 0)
    in_dtypes: tuple[str, ...]
    out_dtypes: tuple[str, ...]
    counts: torch.Tensor  # (outputs, 2): inf, nan per floating output, on the outputs' device


def _floats(obj: Any) -> list[torch.Tensor]:
    """Every floating tensor in nested tuples, lists and dicts (in order, without repeats)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and id(o) not in seen:
                seen.add(id(o))
                found.append(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
    return found


def _dtype_names(tensors: Iterable[torch.Tensor | None]) -> tuple[str, ...]:
    return tuple(str(t.dtype).removeprefix("torch.") for t in tensors if t is not None)


def _nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 2) int64 on the first tensor's device: inf and NaN counts. Syncs: no."""
    with torch.no_grad():
        rows = [torch.stack([t.isinf().sum(), t.isnan().sum()]).to(tensors[0].device) for t in tensors]
        return torch.stack(rows)


def _to_lists(tensors: list[torch.Tensor]) -> list[list[list[int]]]:
    """Each (n, 2) count tensor as nested lists, with one host transfer per device. Syncs: yes."""
    out: list[Any] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i] for i in indices]).tolist()
        start = 0
        for i in indices:
            out[i] = flat[start:start + len(tensors[i])]
            start += len(tensors[i])
    return out


class _Recorder:
    """The state of one trace: the module stack, the ops, and which op created each autograd node."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module_names = {id(m): name for name, m in model.named_modules()}
        self.tensor_names = {id(t): name for name, t in model.named_parameters()}
        self.tensor_names.update({id(t): name for name, t in model.named_buffers()})
        self.stack: list[str] = []
        self.depth = 0  # > 0 while an op is being recorded: its inner calls are part of it
        self.ops: list[_Op] = []
        self.produced: dict[int, tuple[int, int]] = {}  # id(op output) -> (op index, position)
        self.externals: list[tuple[str | None, torch.Tensor]] = []  # (parameter/buffer name, counts)
        self.external_ids: dict[int, int] = {}
        self.kept: list[torch.Tensor] = []  # op outputs and external inputs: keeps their ids unique
        self.sites: dict[Any, _Site] = {}  # autograd node -> who created it

    @property
    def module(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def claim(self, tensors: Iterable[torch.Tensor], site: _Site) -> None:
        """Attribute to `site` every autograd node behind `tensors` that no op has claimed yet."""
        pending = [t.grad_fn for t in tensors if t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or node in self.sites or type(node).__name__ == "AccumulateGrad":
                continue
            self.sites[node] = site
            pending.extend(n for n, _ in node.next_functions)

    def record(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        inputs = _floats((args, kwargs))
        name = getattr(func, "__name__", None) or type(func).__name__
        if name == "__get__":  # a property read: Tensor.T, .mT, .data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if len(name) > 4 and name.startswith("__") and name.endswith("__"):  # x @ y: "matmul"
            name = name[2:-2]
        module = self.module
        # Nodes made outside any recorded call (a custom autograd.Function's) belong to this module.
        self.claim(inputs, _Site(None, "", module))
        out = func(*args, **kwargs)
        outputs = _floats(out)
        if not outputs:
            return out
        index = len(self.ops)
        sources = []
        for t in inputs:
            if id(t) in self.produced:
                sources.append(("op", *self.produced[id(t)]))
                continue
            if id(t) not in self.external_ids:
                self.external_ids[id(t)] = len(self.externals)
                self.externals.append((self.tensor_names.get(id(t)), _nonfinite_counts([t])))
                self.kept.append(t)
            sources.append(("ext", self.external_ids[id(t)], 0))
        for position, t in enumerate(outputs):
            self.produced[id(t)] = (index, position)
        self.kept.extend(outputs)
        self.ops.append(_Op(name, module, sources, _dtype_names(inputs), _dtype_names(outputs),
                            _nonfinite_counts(outputs)))
        self.claim(outputs, _Site(index, name, module))
        return out

    def relabel_unnamed(self) -> None:
        """Sites claimed for nodes no op created get the node's own name."""
        for node, site in self.sites.items():
            if site.op_index is None and not site.op:
                self.sites[node] = site._replace(op=node.name())


class _RecordingMode(TorchFunctionMode):
    """Records every torch call not made from inside another recorded call."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rec = self.recorder
        if rec.depth or getattr(func, "__name__", "") in _SKIPPED:
            return func(*args, **kwargs)
        rec.depth += 1
        try:
            return rec.record(func, args, kwargs)
        finally:
            rec.depth -= 1


def _add_module_hooks(model: torch.nn.Module, rec: _Recorder, handles: list, inner: list) -> None:
    """Pre/post forward hooks on every module keeping the module stack; on the model itself, the
    recording mode is pushed again, innermost, for the length of its forward."""

    for module in model.modules():
        name = rec.module_names[id(module)]
        is_root = module is model
        post_id: list[int] = []

        def pre(module: torch.nn.Module, args: tuple, name: str = name, is_root: bool = is_root,
                post_id: list[int] = post_id) -> None:
            # Run last among the forward hooks, so that hooks added after ours (mixprec.autocast's
            # output casts and rounding) count as this module's.
            module._forward_hooks.move_to_end(post_id[0])
            rec.claim(_floats(args), _Site(None, "", rec.module))
            rec.stack.append(name)
            if is_root:
                mode = _RecordingMode(rec)
                mode.__enter__()
                inner.append(mode)

        def post(module: torch.nn.Module, args: tuple, output: Any, name: str = name,
                 is_root: bool = is_root) -> None:
            rec.claim(_floats(output), _Site(None, "", name))
            if rec.stack and rec.stack[-1] == name:
                rec.stack.pop()
            if is_root and inner:
                inner.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre, prepend=True))
        handle = module.register_forward_hook(post, always_call=True)
        post_id.append(handle.id)
        handles.append(handle)


def _forward_culprit(rec: _Recorder, loss: torch.Tensor) -> Trace | None:
    """The origin of a non-finite loss, following non-finite inputs back from the loss. Syncs: yes."""
    op_counts = _to_lists([op.counts for op in rec.ops])
    ext_counts = [c[0] for c in _to_lists([c for _, c in rec.externals])]

    def bad(source: tuple[str, int, int]) -> bool:
        kind, index, position = source
        return sum(op_counts[index][position] if kind == "op" else ext_counts[index]) > 0

    candidates: list[tuple[int, str | None, bool]] = []  # (op index, external name, inputs finite)
    start = rec.produced.get(id(loss))
    if start is not None:
        pending, seen = [start[0]], set()
        while pending:
            k = pending.pop()
            if k in seen:
                continue
            seen.add(k)
            bad_inputs = [s for s in rec.ops[k].inputs if bad(s)]
            if not bad_inputs:
                candidates.append((k, None, True))
            for kind, index, _ in bad_inputs:
                if kind == "op":
                    pending.append(index)
                else:
                    candidates.append((k, rec.externals[index][0], False))
    if not candidates:  # the loss did not come from a recorded op: the first op that went non-finite
        for k, op in enumerate(rec.ops):
            if any(sum(c) for c in op_counts[k]):
                ext = [rec.externals[i][0] for kind, i, _ in op.inputs if kind == "ext" and bad((kind, i, 0))]
                finite = not any(bad(s) for s in op.inputs)
                candidates.append((k, ext[0] if ext else None, finite))
                break
    if not candidates:
        return Trace("forward", None, "loss", None, (), _dtype_names([loss]),
                     int(loss.isinf().sum()), int(loss.isnan().sum()))
    k, parameter, finite = min(candidates, key=lambda c: (c[0], c[2]))
    op = rec.ops[k]
    inf = sum(c[0] for c in op_counts[k])
    nan = sum(c[1] for c in op_counts[k])
    return Trace("forward", op.module, op.name, k, op.in_dtypes, op.out_dtypes, inf, nan, parameter, finite)


def _graph(loss: torch.Tensor) -> tuple[list[Any], list[torch.Tensor]]:
    """The autograd nodes behind `loss`, and its leaves (tensors autograd accumulates into)."""
    nodes, leaves, seen = [], [], set()
    pending = [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.append(node.variable)
            continue
        nodes.append(node)
        pending.extend(n for n, _ in node.next_functions)
    return nodes, leaves


def _leaf_behind(node: Any, hops: int = 4) -> torch.Tensor | None:
    """The leaf a gradient sent to `node` ends up in, through a short chain of one-input nodes (a cast
    of a parameter, a rounding), or None."""
    for _ in range(hops):
        if node is None:
            return None
        if type(node).__name__ == "AccumulateGrad":
            return node.variable
        nexts = [n for n, _ in node.next_functions if n is not None]
        if len(nexts) != 1:
            return None
        node = nexts[0]
    return None


def _backward_culprit(rec: _Recorder, loss: torch.Tensor, loss_scale: float) -> Trace | None:
    """Run the backward of ``loss * loss_scale`` with hooks on every node; the first node whose
    received gradients were finite and produced ones not. Syncs: yes."""
    seed = torch.full_like(loss, loss_scale)
    if not torch.isfinite(seed).all():
        return Trace("backward", None, "loss * loss_scale", None, _dtype_names([loss]), _dtype_names([seed]),
                     int(seed.isinf().sum()), int(seed.isnan().sum()))
    nodes, leaves = _graph(loss)
    if not leaves:
        return None
    for node in nodes:
        rec.sites.setdefault(node, _Site(None, "", None))
    rec.relabel_unnamed()

    ran: list[tuple[Any, torch.Tensor | None, torch.Tensor | None, tuple, tuple]] = []

    def hook_for(node: Any) -> Callable:
        def hook(produced: tuple, received: tuple) -> None:
            got = [g for g in received if g is not None]
            made = [g for g in produced if g is not None]
            ran.append((node, _nonfinite_counts(got) if got else None,
                        _nonfinite_counts(made) if made else None, received, produced))

        return hook

    handles = [node.register_hook(hook_for(node)) for node in nodes]
    with _GradientsKept(leaves):
        try:
            torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
    received_counts = _to_lists([r for _, r, _, _, _ in ran if r is not None])
    produced_counts = _to_lists([p for _, _, p, _, _ in ran if p is not None])
    ri = pi = 0
    for node, r, p, received, produced in ran:
        got = received_counts[ri] if r is not None else []
        made = produced_counts[pi] if p is not None else []
        ri, pi = ri + (r is not None), pi + (p is not None)
        if any(sum(c) for c in got) or not any(sum(c) for c in made):
            continue
        parameter = None
        made_iter = iter(made)
        for (next_node, _), grad in zip(node.next_functions, produced, strict=False):
            if grad is None:
                continue
            if sum(next(made_iter)) and parameter is None:
                leaf = _leaf_behind(next_node)
                parameter = rec.tensor_names.get(id(leaf)) if leaf is not None else None
        site = rec.sites[node]
        return Trace("backward", site.module, site.op, site.op_index, _dtype_names(received),
                     _dtype_names(produced), sum(c[0] for c in made), sum(c[1] for c in made), parameter)
    return None


class _GradientsKept:
    """Restores ``.grad`` of `leaves`, and the FP32 gradients of any `MasterWeights` over them (its
    hooks add into ``master.grad`` whenever autograd computes a parameter's gradient)."""

    def __init__(self, leaves: list[torch.Tensor]) -> None:
        ids = {id(t) for t in leaves}
        self.grads = [(t, t.grad, None if t.grad is None else (t.grad._version, t.grad.clone())) for t in leaves]
        slots = [s for owner in list(_master._LIVE) for s in owner.grad_slots if id(s.param) in ids]
        self.slots = [(s, s.master.grad, s.settled,
                       None if s.master.grad is None else (s.master.grad._version, s.master.grad.clone()))
                      for s in slots]

    def __enter__(self) -> _GradientsKept:
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for t, grad, saved in self.grads:
                _put_back(t, grad, saved)
            for slot, grad, settled, saved in self.slots:
                _put_back(slot.master, grad, saved)
                slot.settled = settled


def _put_back(t: torch.Tensor, grad: torch.Tensor | None, saved: tuple[int, torch.Tensor] | None) -> None:
    if t.grad is not grad:
        t.grad = grad
    if grad is not None and saved is not None and grad._version != saved[0]:
        grad.copy_(saved[1])


def trace_nonfinite(model: torch.nn.Module, run: Callable[[], torch.Tensor], *,
                    loss_scale: float = 1.0) -> Trace | None:
    """Re-run a failing step and name the op and module where values first became inf or NaN.

    Args:
        model: the model ``run`` calls (plain, or prepared with `mixprec.prepare`).
        run: a zero-argument callable doing the step's forward and returning the loss, e.g.
            ``lambda: loss_fn(model(x), y)``; it may open ``mp.autocast(model)`` itself, or the trace
            may be called inside one.
        loss_scale: the loss scale the failing step used (``info.loss_scale`` from `mixprec.step`);
            the backward runs on ``loss * loss_scale``, so an overflow the scale caused is found.

    Returns:
        A `Trace` naming the first non-finite op (forward if the loss was non-finite, else backward),
        or None if the loss and every gradient were finite.

    Raises:
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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace_nonfinite takes the model (a torch.nn.Module), got {type(model).__name__}")
    if not callable(run):
        raise TypeError(f"run must be a zero-argument callable returning the loss, got {type(run).__name__}")
    try:
        loss_scale = float(loss_scale)
    except (TypeError, ValueError):
        raise ValueError(f"loss_scale must be a positive number, got {loss_scale!r}") from None
    if not loss_scale > 0:
        raise ValueError(f"loss_scale must be a positive number (the step's info.loss_scale), got {loss_scale!r}")

    rec = _Recorder(model)
    handles: list[Any] = []
    inner: list[_RecordingMode] = []
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        try:
            _add_module_hooks(model, rec, handles, inner)
            with _RecordingMode(rec):
                loss = run()
            for handle in handles:  # the backward needs none of them
                handle.remove()
            if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
                raise TypeError(f"run must return the loss as a floating tensor, got "
                                f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else loss.dtype}")
            if not torch.isfinite(loss).all():
                return _forward_culprit(rec, loss)
            if loss.grad_fn is None:
                return None
            return _backward_culprit(rec, loss, loss_scale)
        finally:
            while inner:  # left open only if a forward hook could not run
                inner.pop().__exit__(None, None, None)
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for b, saved in buffers:  # BatchNorm's running statistics, its batch counter
                    if not torch.equal(b, saved):  # (also when NaN is in both: copying is harmless)
                        b.copy_(saved)
