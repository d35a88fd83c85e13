"""Recording a step's forward for `trace_nonfinite`: the ops, the module running each, and who created
each autograd node.

A `Recorder` holds one trace's state; `RecordingMode` (a `TorchFunctionMode`) hands it every torch call
made outside another recorded call, and `add_module_hooks` keeps its module stack. Every call with
floating outputs becomes an `Op`: its name, its module, where each floating input came from (an earlier
op's output, or an external tensor: a parameter, a buffer, the model's input), its dtypes, and its
outputs' inf/NaN counts, taken on the device as it runs (`to_lists` brings them to the host, one
transfer per device). Each autograd node made during the forward is mapped to the `Site` that created it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, TypeGuard

import torch
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..state import prepared_state

__all__ = ["AccumulateGrad", "Op", "Recorder", "RecordingMode", "Site", "Source", "add_module_hooks",
           "dtype_names", "floats", "is_accumulate_grad", "nonfinite_counts", "to_lists"]

# Attribute writes and metadata reads: not computations.
_SKIPPED = frozenset({"__set__", "__repr__", "__format__", "__str__", "__len__", "__bool__", "__hash__"})

#: Where an op's input came from: ("op", op index, output position) or ("ext", external index, 0).
Source = tuple[str, int, int]


class Site(NamedTuple):
    """Who created an autograd node: a recorded op (index, name) or, index None, nobody recorded."""

    op_index: int | None
    op: str
    module: str | None


class Op(NamedTuple):
    """One recorded call with floating outputs."""

    name: str
    module: str | None
    inputs: list[Source]
    in_dtypes: tuple[str, ...]
    out_dtypes: tuple[str, ...]
    counts: torch.Tensor  # (outputs, 2): inf, nan per floating output, on the outputs' device


class AccumulateGrad(Protocol):
    """The autograd node that adds a gradient into a leaf tensor (torch's stubs do not describe it)."""

    variable: torch.Tensor


def is_accumulate_grad(node: Node) -> TypeGuard[AccumulateGrad]:
    """Whether `node` accumulates into a leaf (a parameter, an input that requires grad): the graph's end."""
    return type(node).__name__ == "AccumulateGrad"


def floats(obj: Any) -> list[torch.Tensor]:
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


def dtype_names(tensors: Iterable[torch.Tensor | None]) -> tuple[str, ...]:
    """The dtypes of the tensors given (``"float16"``), skipping Nones."""
    return tuple(str(t.dtype).removeprefix("torch.") for t in tensors if t is not None)


def nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 2) int64 on the first tensor's device: inf and NaN counts. Syncs: no."""
    with torch.no_grad():
        rows = [torch.stack([t.isinf().sum(), t.isnan().sum()]).to(tensors[0].device) for t in tensors]
        return torch.stack(rows)


def to_lists(tensors: list[torch.Tensor]) -> list[list[list[int]]]:
    """Each (n, 2) count tensor as nested lists, with one host transfer per device. Syncs: yes."""
    out: list[list[list[int]]] = [[] for _ in tensors]
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


def _op_name(func: Callable[..., Any]) -> str:
    """The name an op is reported by: ``"linear"``, ``"matmul"`` for ``x @ y``, ``"T"`` for ``Tensor.T``."""
    name: str = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property read: Tensor.T, .mT, .data
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if len(name) > 4 and name.startswith("__") and name.endswith("__"):  # x @ y: "matmul"
        name = name[2:-2]
    return name


class Recorder:
    """The state of one trace: the module stack, the ops, and which op created each autograd node."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module_names = {id(m): name for name, m in model.named_modules()}
        self.tensor_names = {id(t): name for name, t in model.named_parameters()}
        self.tensor_names.update({id(t): name for name, t in model.named_buffers()})
        self.stack: list[str] = []
        self.depth = 0  # > 0 while an op is being recorded: its inner calls are part of it
        self.ops: list[Op] = []
        self.produced: dict[int, tuple[int, int]] = {}  # id(op output) -> (op index, position)
        self.externals: list[tuple[str | None, torch.Tensor]] = []  # (parameter/buffer name, counts)
        self.external_ids: dict[int, int] = {}
        self.kept: list[torch.Tensor] = []  # op outputs and external inputs: keeps their ids unique
        self.sites: dict[Node, Site] = {}  # autograd node -> who created it
        self.prepared = prepared_state(model)  # what mp.prepare left on the model, or None
        self.forwards_outside_autocast = 0  # forwards of a prepared model run with its mp.autocast closed

    @property
    def module(self) -> str | None:
        """The innermost module running (None: outside the model)."""
        return self.stack[-1] if self.stack else None

    def claim(self, tensors: Iterable[torch.Tensor], site: Site) -> None:
        """Attribute to `site` every autograd node behind `tensors` that no op has claimed yet."""
        pending: list[Node | None] = [t.grad_fn for t in tensors if t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or node in self.sites or is_accumulate_grad(node):
                continue
            self.sites[node] = site
            pending.extend(n for n, _ in node.next_functions)

    def record(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``func(*args, **kwargs)``; if it has floating outputs, record it as the next op."""
        inputs = floats((args, kwargs))
        name = _op_name(func)
        module = self.module
        # Nodes made outside any recorded call (a custom autograd.Function's) belong to this module.
        self.claim(inputs, Site(None, "", module))
        out = func(*args, **kwargs)
        outputs = floats(out)
        if not outputs:
            return out
        index = len(self.ops)
        sources = [self._source(t) for t in inputs]
        for position, t in enumerate(outputs):
            self.produced[id(t)] = (index, position)
        self.kept.extend(outputs)
        self.ops.append(Op(name, module, sources, dtype_names(inputs), dtype_names(outputs),
                           nonfinite_counts(outputs)))
        self.claim(outputs, Site(index, name, module))
        return out

    def _source(self, t: torch.Tensor) -> Source:
        """Where an op's input came from; a tensor no op made is numbered as an external on first sight."""
        if id(t) in self.produced:
            return ("op", *self.produced[id(t)])
        if id(t) not in self.external_ids:
            self.external_ids[id(t)] = len(self.externals)
            self.externals.append((self.tensor_names.get(id(t)), nonfinite_counts([t])))
            self.kept.append(t)
        return ("ext", self.external_ids[id(t)], 0)

    def enter_model(self) -> None:
        """The model's forward begins: count it if the model is prepared and its `mp.autocast` is not open
        (then the forward runs without the policy's compute formats)."""
        if self.prepared is not None and not self.prepared.in_autocast:
            self.forwards_outside_autocast += 1

    def relabel_unnamed(self) -> None:
        """Sites claimed for nodes no op created get the node's own name."""
        for node, site in self.sites.items():
            if site.op_index is None and not site.op:
                self.sites[node] = site._replace(op=node.name())


class RecordingMode(TorchFunctionMode):
    """Records every torch call not made from inside another recorded call."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        rec = self.recorder
        if rec.depth or getattr(func, "__name__", "") in _SKIPPED:
            return func(*args, **kwargs)
        rec.depth += 1
        try:
            return rec.record(func, args, kwargs)
        finally:
            rec.depth -= 1


def add_module_hooks(model: torch.nn.Module, rec: Recorder, handles: list[RemovableHandle],
                     inner: list[RecordingMode]) -> None:
    """Pre/post forward hooks on every module keeping the module stack; on the model itself, the
    recording mode is pushed again, innermost, for the length of its forward."""

    for module in model.modules():
        name = rec.module_names[id(module)]
        is_root = module is model
        post_id: list[int] = []

        def pre(module: torch.nn.Module, args: tuple[Any, ...], name: str = name, is_root: bool = is_root,
                post_id: list[int] = post_id) -> None:
            # Run last among the forward hooks, so that hooks added after ours (mixprec.autocast's
            # output casts and rounding) count as this module's: re-inserting a key moves it to the end.
            hooks = module._forward_hooks
            hooks[post_id[0]] = hooks.pop(post_id[0])
            rec.claim(floats(args), Site(None, "", rec.module))
            rec.stack.append(name)
            if is_root:
                rec.enter_model()
                mode = RecordingMode(rec)
                mode.__enter__()
                inner.append(mode)

        def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any, name: str = name,
                 is_root: bool = is_root) -> None:
            rec.claim(floats(output), Site(None, "", name))
            if rec.stack and rec.stack[-1] == name:
                rec.stack.pop()
            if is_root and inner:
                inner.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre, prepend=True))
        handle = module.register_forward_hook(post, always_call=True)
        post_id.append(handle.id)
        handles.append(handle)
