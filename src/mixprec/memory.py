"""Bytes of training memory by category, counted from the real tensors: `memory`.

Five categories: parameters, masters (FP32 copies of 16-bit parameters), gradients (``p.grad`` on the
model and, with masters, the FP32 ``master.grad``), optimizer_state (the inner optimizer's state
tensors) and activations (the tensors autograd saves for backward in one forward pass, found with
``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers it saves are not activations).

Two columns: ``held``, the bytes the tensors occupy now (each storage counted once, in the first
category it appears in), and ``formats``, the bytes they would occupy in the policy's formats. They
differ only in emulation, where 16-bit values live in float32 storage: an emulated FP16 parameter is
held in 4 bytes and counts 2 in ``formats``, its gradient likewise, and the moments of an optimizer
without masters take the parameter's format. Emulated activations count once per source tensor (the
FP32 copies emulation makes for its FP32 arithmetic, casts and views count with the tensor they copy;
copies of parameters not at all), every floating one at the compute format's width: tensors a native
run keeps in FP32 (the loss's input, FP32 islands' inputs) count narrower, so on the built-in recipes
this is 19-25% under a native count (run ``execution=native``, which a CPU has for f16 and bf16, for
the exact figure). Natively, and for an unprepared model, ``formats`` is ``held``. See docs/memory.md.

Example:
    >>> import mixprec as mp
    >>> model = torch.nn.Linear(4, 4)
    >>> model, opt, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    >>> report = memory(model, opt, run=lambda: model(torch.ones(2, 4)).sum())
    >>> report.held["parameters"], report.formats["parameters"], report.held["masters"]
    (80, 40, 80)
"""

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from .state import PreparedState, prepared_state, unwrap

CATEGORIES = ("parameters", "masters", "gradients", "optimizer_state", "activations")
#: autograd nodes whose output holds its input's data again (a cast, a view, mixprec's rounding): in
#: emulation a tensor saved through them counts once per source, as the one tensor a native run saves.
_SAME_DATA = ("ToCopyBackward", "TBackward", "TransposeBackward", "ViewBackward", "PermuteBackward", "ExpandBackward",
              "_RoundBackward")


@dataclass
class MemoryReport:
    """What `memory` counted: bytes per category (`CATEGORIES`), ``held`` and in the policy's ``formats``.

    Attributes:
        held: category -> bytes the tensors occupy now.
        formats: category -> bytes in the policy's formats (equal to ``held`` unless emulated).
        peak: CUDA: ``torch.cuda.max_memory_allocated`` during ``run`` (reset before it); else None.
        execution: ``"native"``, ``"emulated"``, or None for a model `mixprec.prepare` did not prepare.
    """

    held: dict[str, int]
    formats: dict[str, int]
    peak: int | None
    execution: str | None

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [(k, self.held[k], self.formats[k]) for k in CATEGORIES]
        rows.append(("total", sum(self.held.values()), sum(self.formats.values())))
        lines = [f"{'bytes':<16}{'held':>14}{'formats':>14}"] + [f"{k:<16}{h:>14,}{f:>14,}" for k, h, f in rows]
        return "\n".join(lines + ([f"{'peak (CUDA)':<16}{self.peak:>14,}"] if self.peak is not None else []))


def memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
           run: Callable[[], object] | None = None) -> MemoryReport:
    """Count the bytes ``model`` (prepared by `mixprec.prepare` or not) and ``optimizer`` hold now,
    and the activations one forward pass saves for backward.

    Args:
        model: the model (a DDP or torch.compile wrapper is looked through).
        optimizer: the optimizer `prepare` returned (a `MasterWeights`: masters and the inner optimizer's
            state), or any optimizer; None: a prepared model's own `MasterWeights`, if any.
        run: a zero-argument callable doing one forward, e.g. ``lambda: loss_fn(model(x), y)`` (open
            ``mp.autocast`` inside it). Its saved tensors are counted, then its graph is dropped (no
            backward needed). It runs as any forward does: in train mode it updates BatchNorm statistics
            and draws dropout masks. None: activations are 0.

    Gradients and optimizer state count what exists when called: call after a backward (before the
    step) for the gradients, after a first step for Adam's moments. Buffers are not counted. A model on
    the meta device counts as on a CPU (give ``run`` meta inputs); a sparse gradient counts its indices
    and values.
    Syncs: no (only sizes are read); on CUDA, with ``run``, it resets the peak-memory statistics.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> r = memory(net, run=lambda: net(torch.ones(4, 8)).sum())
        >>> r.held["activations"]  # Linear saves its input (4x8 FP32), ReLU its output (4x8 FP32)
        256
    """
    if not isinstance(model, torch.nn.Module) or not (run is None or callable(run)) or not (
            optimizer is None or isinstance(optimizer, torch.optim.Optimizer)):
        raise TypeError(f"memory(model, optimizer=None, run=None) takes a torch.nn.Module, a torch.optim.Optimizer "
                        f"or None, and a zero-argument callable doing one forward (run=lambda: loss_fn(model(x), y)) "
                        f"or None; got {type(model).__name__}, {type(optimizer).__name__}, {type(run).__name__}")
    model, state = unwrap(model), prepared_state(model)
    opt = optimizer if optimizer is not None or state is None else state.master_weights  # may be None
    counter = _Counter(model.buffers())
    for category, t, width in _tensors(model, state, opt):
        counter.add(category, t, width)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    execution = state.execution if state is not None else None
    cuda = run is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if run is not None:
        compute_bits = state.policy.compute.bits if state is not None and execution == "emulated" else None
        _count_activations(counter, run, compute_bits)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return MemoryReport(counter.held, counter.formats, peak, execution)


class _Counter:
    """Bytes per category, ``held`` and in the policy's formats; each storage once, in the first category
    it is found in (buffers are not counted: they are seen from the start)."""

    def __init__(self, buffers: Iterable[torch.Tensor]) -> None:
        self.held = dict.fromkeys(CATEGORIES, 0)
        self.formats = dict.fromkeys(CATEGORIES, 0)
        self.seen = {_key(b) for b in buffers}

    def add(self, category: str, t: torch.Tensor | None, width: int | None = None) -> None:
        """Count `t` (width: its format's bits per element; None: as held)."""
        if t is None:
            return
        if t.is_sparse:  # a sparse COO gradient has no storage: its indices' and values' storages count
            self.add(category, t._indices())
            self.add(category, t._values(), width)
            return
        if _key(t) in self.seen:
            return
        self.seen.add(_key(t))
        held = t.untyped_storage().nbytes()
        self.held[category] += held
        self.formats[category] += held if width is None else held * width // (8 * t.element_size())


def _tensors(model: torch.nn.Module, state: PreparedState | None,
             opt: torch.optim.Optimizer | None) -> list[tuple[str, torch.Tensor | None, int | None]]:
    """(category, tensor, its format's bits or None) for every tensor the model and optimizer hold."""
    # The masters: the given MasterWeights', else (a plain or the inner optimizer given) the prepared model's.
    weights = opt if hasattr(opt, "grad_slots") else getattr(state, "master_weights", None)
    slots = getattr(weights, "grad_slots", [])
    named = state.param_formats if state is not None else {}
    bits = {id(p): named[n].bits for n, p in model.named_parameters() if n in named}  # each one's storage format
    params = list(model.parameters())
    found: list[tuple[str, torch.Tensor | None, int | None]] = [("parameters", p, bits.get(id(p))) for p in params]
    found += [("masters", t, None) for t in getattr(weights, "held_tensors", list)()]  # FP32, remainders, ...
    found += [("gradients", p.grad, bits.get(id(p))) for p in params]  # 16-bit (emulated: on its format's grid)
    found += [("gradients", s.master.grad, None) for s in slots]  # the FP32 gradient on the master
    state_items = opt.state.items() if opt is not None else ()  # moments shaped like a 16-bit parameter: its format
    found += [("optimizer_state", t, bits.get(id(key)) if t.shape == key.shape else None)
              for key, values in state_items for t in values.values() if torch.is_tensor(t)]
    return found


def _count_activations(counter: _Counter, run: Callable[[], object], compute_bits: int | None) -> None:
    """Count the tensors one forward (`run`) saves for backward; emulated (`compute_bits` given): each
    source once, every floating one at the compute format's width (see _SAME_DATA)."""
    before: set = set(counter.seen)
    sources: set = set()
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)  # alive until counted: no storage address is reused meanwhile
        counted = counter.formats["activations"]
        counter.add("activations", t)
        if compute_bits is not None:
            node, nr = t.grad_fn, t.output_nr
            while node is not None and type(node).__name__.rstrip("0123456789").endswith(_SAME_DATA):
                node, nr = node.next_functions[0]
            key = (node, nr) if node is not None else _key(t)  # a parameter's copy leads to its AccumulateGrad
            new = key not in sources and key not in before and not hasattr(node, "variable")
            sources.add(key)
            element_bits = min(8 * t.element_size(), compute_bits if t.is_floating_point() else 64)  # integers as is
            elements = t.untyped_storage().nbytes() // t.element_size()
            counter.formats["activations"] = counted + new * elements * element_bits // 8
        return t.detach()  # not t: a saved output holding its own grad_fn would never be freed (a cycle)

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        try:
            _ = run()  # the result, and with it the graph, is dropped on return
        finally:  # each saved tensor's hooks hold pack, which holds these: clear them, or nothing is freed
            kept.clear()
            sources.clear()


def _key(t: torch.Tensor) -> tuple[torch.device, int]:
    storage = getattr(t, "_local_tensor", t).untyped_storage()  # a DTensor (FSDP2): this rank's shard
    # The storage's address; a meta (or empty) storage has none (0 for all): then the storage itself.
    return t.device, storage.data_ptr() or storage._cdata
