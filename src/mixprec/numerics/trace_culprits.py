"""Finding the culprit in a recorded step, for `trace_nonfinite`.

* `forward_culprit`: the loss is non-finite; follow the non-finite inputs back from the op that made
  it to an op whose inputs were all finite (the origin), or to a parameter or input that already held
  non-finite values.
* `backward_culprit`: the loss is finite; run the backward of ``loss * loss_scale`` with a hook on
  every autograd node of the step's graph, and name the first node to run whose received gradients
  were finite and whose produced ones were not, as the op that created it in forward.
* `GradientsKept`: that backward leaves every ``.grad`` (and the FP32 master gradients of
  `mixprec.MasterWeights`) as it found them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.autograd.graph import Node

from ..master import live_owners
from .trace_recording import Recorder, Site, Source, dtype_names, is_accumulate_grad, nonfinite_counts, to_lists
from .trace_result import Trace

__all__ = ["GradientsKept", "backward_culprit", "forward_culprit"]

#: A forward op that may be the origin: (op index, the non-finite external it read, inputs all finite).
_Candidate = tuple[int, str | None, bool]

#: The gradients an autograd node received or produced (None where there is none).
_Grads = tuple[torch.Tensor | None, ...]

#: A gradient's version counter and a copy of its values, to put back what a backward added into it.
_Saved = tuple[int, torch.Tensor]


class _Counts:
    """The forward's inf/NaN counts on the host: per op output and per external input. Syncs: yes."""

    def __init__(self, rec: Recorder) -> None:
        self.ops = to_lists([op.counts for op in rec.ops])
        self.externals = [c[0] for c in to_lists([c for _, c in rec.externals])]

    def bad(self, source: Source) -> bool:
        """Whether the input `source` names held an inf or a NaN."""
        kind, index, position = source
        return sum(self.ops[index][position] if kind == "op" else self.externals[index]) > 0


def _origins(rec: Recorder, counts: _Counts, start: int) -> list[_Candidate]:
    """Walking back from op `start` through non-finite inputs: the ops whose inputs were all finite, and
    the ops that read a non-finite external (a parameter, a buffer, the model's input)."""
    candidates: list[_Candidate] = []
    pending: list[int] = [start]
    seen: set[int] = set()
    while pending:
        k = pending.pop()
        if k in seen:
            continue
        seen.add(k)
        bad_inputs = [s for s in rec.ops[k].inputs if counts.bad(s)]
        if not bad_inputs:
            candidates.append((k, None, True))
        for kind, index, _ in bad_inputs:
            if kind == "op":
                pending.append(index)
            else:
                candidates.append((k, rec.externals[index][0], False))
    return candidates


def _first_nonfinite_op(rec: Recorder, counts: _Counts) -> list[_Candidate]:
    """The first op with a non-finite output (none if there is none)."""
    for k, op in enumerate(rec.ops):
        if any(sum(c) for c in counts.ops[k]):
            ext = [rec.externals[i][0] for kind, i, _ in op.inputs if kind == "ext" and counts.bad((kind, i, 0))]
            finite = not any(counts.bad(s) for s in op.inputs)
            return [(k, ext[0] if ext else None, finite)]
    return []


def forward_culprit(rec: Recorder, loss: torch.Tensor) -> Trace:
    """The origin of a non-finite loss, following non-finite inputs back from the loss. Syncs: yes."""
    counts = _Counts(rec)
    start = rec.produced.get(id(loss))
    candidates = _origins(rec, counts, start[0]) if start is not None else []
    if not candidates:  # the loss did not come from a recorded op: the first op that went non-finite
        candidates = _first_nonfinite_op(rec, counts)
    if not candidates:
        return Trace("forward", None, "loss", None, (), dtype_names([loss]),
                     int(loss.isinf().sum()), int(loss.isnan().sum()))
    k, parameter, finite = min(candidates, key=lambda c: (c[0], c[2]))
    op = rec.ops[k]
    inf = sum(c[0] for c in counts.ops[k])
    nan = sum(c[1] for c in counts.ops[k])
    return Trace("forward", op.module, op.name, k, op.in_dtypes, op.out_dtypes, inf, nan, parameter, finite)


def _graph(loss: torch.Tensor) -> tuple[list[Node], list[torch.Tensor]]:
    """The autograd nodes behind `loss`, and its leaves (tensors autograd accumulates into)."""
    nodes: list[Node] = []
    leaves: list[torch.Tensor] = []
    seen: set[Node] = set()
    pending: list[Node | None] = [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if is_accumulate_grad(node):
            leaves.append(node.variable)
            continue
        nodes.append(node)
        pending.extend(n for n, _ in node.next_functions)
    return nodes, leaves


def _leaf_behind(node: Node | None, hops: int = 4) -> torch.Tensor | None:
    """The leaf a gradient sent to `node` ends up in, through a short chain of one-input nodes (a cast
    of a parameter, a rounding), or None."""
    for _ in range(hops):
        if node is None:
            return None
        if is_accumulate_grad(node):
            return node.variable
        nexts = [n for n, _ in node.next_functions if n is not None]
        if len(nexts) != 1:
            return None
        node = nexts[0]
    return None


class _Ran(NamedTuple):
    """One autograd node's hook call: the gradients it received and produced, and their counts."""

    node: Node
    received_counts: torch.Tensor | None  # (received, 2) inf, nan; None when it received none
    produced_counts: torch.Tensor | None
    received: _Grads
    produced: _Grads


def _hooked_backward(loss: torch.Tensor, seed: torch.Tensor, nodes: list[Node],
                     leaves: list[torch.Tensor]) -> list[_Ran]:
    """Run the backward of `loss` from `seed` with a hook on every node, `leaves`' gradients kept; the
    hooks' calls in the order the nodes ran."""
    ran: list[_Ran] = []

    def hook_for(node: Node) -> Callable[[_Grads, _Grads], None]:
        def hook(produced: _Grads, received: _Grads) -> None:
            got = [g for g in received if g is not None]
            made = [g for g in produced if g is not None]
            ran.append(_Ran(node, nonfinite_counts(got) if got else None,
                            nonfinite_counts(made) if made else None, received, produced))

        return hook

    handles = [node.register_hook(hook_for(node)) for node in nodes]
    with GradientsKept(leaves):
        try:
            torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
    return ran


def _parameter_written(rec: Recorder, node: Node, produced: _Grads, made: list[list[int]]) -> str | None:
    """The name of the first parameter (or buffer) that a non-finite gradient `node` produced flows into."""
    made_iter = iter(made)
    for (next_node, _), grad in zip(node.next_functions, produced, strict=False):
        if grad is None:
            continue
        if sum(next(made_iter)):
            leaf = _leaf_behind(next_node)
            name = rec.tensor_names.get(id(leaf)) if leaf is not None else None
            if name is not None:
                return name
    return None


def _first_bad_node(rec: Recorder, ran: list[_Ran]) -> Trace | None:
    """The first node to run whose received gradients were finite and produced ones not. Syncs: yes."""
    received_counts = iter(to_lists([r.received_counts for r in ran if r.received_counts is not None]))
    produced_counts = iter(to_lists([r.produced_counts for r in ran if r.produced_counts is not None]))
    for r in ran:
        got = next(received_counts) if r.received_counts is not None else []
        made = next(produced_counts) if r.produced_counts is not None else []
        if any(sum(c) for c in got) or not any(sum(c) for c in made):
            continue
        parameter = _parameter_written(rec, r.node, r.produced, made)
        site = rec.sites[r.node]
        return Trace("backward", site.module, site.op, site.op_index, dtype_names(r.received),
                     dtype_names(r.produced), sum(c[0] for c in made), sum(c[1] for c in made), parameter)
    return None


def backward_culprit(rec: Recorder, loss: torch.Tensor, loss_scale: float) -> Trace | None:
    """Run the backward of ``loss * loss_scale`` with hooks on every node; the first node whose
    received gradients were finite and produced ones not. Syncs: yes."""
    seed = torch.full_like(loss, loss_scale)
    if not torch.isfinite(seed).all():
        return Trace("backward", None, "loss * loss_scale", None, dtype_names([loss]), dtype_names([seed]),
                     int(seed.isinf().sum()), int(seed.isnan().sum()))
    nodes, leaves = _graph(loss)
    if not leaves:
        return None
    for node in nodes:
        rec.sites.setdefault(node, Site(None, "", None))
    rec.relabel_unnamed()
    return _first_bad_node(rec, _hooked_backward(loss, seed, nodes, leaves))


def _saved(grad: torch.Tensor | None) -> _Saved | None:
    """A gradient's version and a copy of its values (None for no gradient)."""
    return None if grad is None else (grad._version, grad.clone())


class GradientsKept:
    """Restores ``.grad`` of `leaves`, and the FP32 gradients of any `MasterWeights` over them (its
    hooks add into ``master.grad`` whenever autograd computes a parameter's gradient)."""

    def __init__(self, leaves: list[torch.Tensor]) -> None:
        ids = {id(t) for t in leaves}
        self.grads = [(t, t.grad, _saved(t.grad)) for t in leaves]
        slots = [s for owner in live_owners() for s in owner.grad_slots if id(s.param) in ids]
        self.slots = [(s, s.master.grad, s.settled, _saved(s.master.grad)) for s in slots]

    def __enter__(self) -> GradientsKept:
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for t, grad, saved in self.grads:
                _put_back(t, grad, saved)
            for slot, grad, settled, saved in self.slots:
                _put_back(slot.master, grad, saved)
                slot.settled = settled


def _put_back(t: torch.Tensor, grad: torch.Tensor | None, saved: _Saved | None) -> None:
    """Make `grad` the ``.grad`` of `t` again, with the values it had when `saved`."""
    if t.grad is not grad:
        t.grad = grad
    if grad is not None and saved is not None and grad._version != saved[0]:
        grad.copy_(saved[1])
