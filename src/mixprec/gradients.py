"""One gradient in two precisions: the 16-bit one on the model, where PyTorch keeps it, and its FP32
refinement on the master weight, which the optimizer steps on.

``param.grad`` is THE gradient: what users read, clip, mask, hook and clear, by any path (torch ops,
``.data``, hooks, ``set_``). ``master.grad`` only adds bits to it: an FP32 value counts only where it
still rounds to ``param.grad``, checked by value at every use (`GradSlot.settle_`), never trusted on a
stamp. The same holds for the weights: a master counts only where it rounds to its parameter. Why
values and not stamps (object, storage, version counter): writes through ``.data`` (``grad.data.zero_()``,
``weight.data.clamp_()``) and hooks do not bump a version counter, so a stamp can be fooled; a value
cannot. The cost is a few elementwise passes per step (benchmarks/bench_step.py).

How a backward reaches both (hooks that `mixprec.MasterWeights` registers, first in PyTorch's order):

1. a tensor hook, before any other: ``master.grad`` becomes the FP32 form of ``param.grad`` as it stands
   (None if None), and ``param.grad`` is zeroed, so that autograd's accumulation leaves in it exactly this
   backward's gradient, after every user hook has run on it; under ``torch.autograd.grad``, which never
   accumulates, it does nothing;
2. a post-accumulate-grad hook, before any other: that gradient is added into ``master.grad`` in FP32
   (micro-batches sum in FP32) and ``param.grad`` becomes its rounding; users' post-accumulate hooks
   then see and may change the sum, as in plain PyTorch.

The DDP hook in `mixprec.distributed` reads and writes the same slots.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.autograd.graph import get_gradient_edge

from .formats import Format
from .quantize import quantize

__all__ = ["GradSlot", "rounding_hook", "accumulates", "put_first"]


class GradSlot:
    """One parameter with an FP32 master: how its 16-bit gradient and the FP32 one stay one gradient.

    ``param.grad`` (16-bit, or FP32 storage on ``fmt``'s grid when emulated) is the gradient everyone
    sees; ``master.grad`` (FP32) is the same gradient with more bits, valid where it rounds to it.
    ``reduced`` is set when mixprec's DDP communication hook produced ``master.grad`` (so it is equal
    on every rank); ``settled`` once the step took ``master.grad`` (which it then unscales in place).
    """

    __slots__ = ("param", "master", "fmt", "emulated", "reduced", "settled")

    def __init__(self, param: torch.Tensor, master: torch.Tensor, fmt: Format, emulated: bool) -> None:
        self.param, self.master, self.fmt, self.emulated = param, master, fmt, emulated
        self.reduced = self.settled = False

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """`x` rounded onto the parameter's format, in the parameter's dtype."""
        return quantize(x, self.fmt) if self.emulated else x.to(self.param.dtype)

    def refine(self, fp32: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """`fp32` where it rounds to `visible` (and is in range), else `visible` (rounded) in FP32."""
        rounded = self.round(fp32)
        keep = (rounded == visible) & torch.isfinite(rounded)
        return torch.where(keep, fp32, visible if not self.emulated else quantize(visible, self.fmt))

    def settle_(self, trust_fp32: bool = True) -> None:
        """Make ``master.grad`` the FP32 form of ``param.grad`` (None when it is None), by value.

        Between micro-batches ``master.grad`` holds an FP32 sum with bits ``param.grad`` lacks, kept where
        it still rounds to it; after a single backward it is None: ``param.grad`` holds all there is.
        """
        visible = self.param.grad
        if visible is None:
            self.master.grad = None
        elif self.master.grad is None or not trust_fp32:
            self.master.grad = (quantize(visible, self.fmt) if self.emulated else visible).to(
                torch.float32, copy=True)
        elif not _same(self.round(self.master.grad), visible):
            self.master.grad = self.refine(self.master.grad, visible)

    def sync_master_(self, trust_fp32: bool = True) -> None:
        """Keep the master where it still rounds to the parameter; elsewhere take the parameter's value."""
        if not trust_fp32:
            self.master.copy_(self.param)
        elif not _same(self.round(self.master), self.param):
            self.master.copy_(self.refine(self.master, self.param))

    def release_(self) -> None:
        """Drop this step's FP32 gradient: the step consumed it (applied or skipped)."""
        self.master.grad = None
        self.reduced = self.settled = False

    def publish_(self) -> None:
        """Write the rounding of ``master.grad`` into ``param.grad`` (after the step unscaled or clipped it),
        so that both read the same gradient again, in the same units."""
        if self.master.grad is not None and self.param.grad is not None:
            self.param.grad.copy_(self.round(self.master.grad))

    def accumulate_hook(self, grad: torch.Tensor) -> None:
        # Before users' hooks and autograd's accumulation (see the module docstring); returns None, so
        # the incoming gradient goes on unchanged.
        if not accumulates(self.param):
            return
        with torch.no_grad():
            self.settle_()
            self.settled = False
            if self.param.grad is not None:
                self.param.grad.zero_()

    def write_back_hook(self, param: torch.Tensor) -> None:
        # After autograd's accumulation: param.grad holds this backward's gradient alone (zeroed above).
        # The first one needs no FP32 copy (a 16-bit gradient has no more bits); a later one is summed in FP32.
        grad = param.grad
        assert grad is not None  # autograd calls this hook right after accumulating into it
        with torch.no_grad():
            if self.master.grad is None:
                if self.emulated:
                    grad.copy_(quantize(grad, self.fmt))
            else:
                self.master.grad.add_(quantize(grad, self.fmt) if self.emulated else grad)
                grad.copy_(self.round(self.master.grad))


_BITS = {2: torch.int16, 4: torch.int32}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Whether two tensors of one dtype hold the same bits, where asking costs no host sync (the CPU; a
    memory compare, several times faster than comparing as floats); else None: the caller then does the
    elementwise work (on an accelerator a few passes cost less than a sync)."""
    if a.device.type != "cpu" or a.dtype != b.dtype or a.element_size() not in _BITS:
        return None
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def accumulates(param: torch.Tensor) -> bool:
    """Whether the running backward adds into ``param.grad``: False inside ``torch.autograd.grad``
    (which returns gradients and accumulates none) or a ``backward(inputs=...)`` that leaves it out."""
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(param).node)
    except RuntimeError:  # torch refuses to answer for a leaf inside autograd.grad, which never accumulates
        return False


def put_first(hooks: dict | None, handle: torch.utils.hooks.RemovableHandle) -> None:
    """Move the hook of `handle` to the front of a tensor's hook dict, so that it runs before any other
    (hooks registered earlier by users included)."""
    assert isinstance(hooks, OrderedDict), "torch keeps a tensor's hooks in an OrderedDict"
    hooks.move_to_end(handle.id, last=False)


def rounding_hook(fmt: Format) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook rounding ``p.grad`` onto `fmt`, as a 16-bit parameter's .grad is rounded
    (emulated parameters without an FP32 master). A partial, not a closure: the model still pickles."""
    return functools.partial(_round_grad, fmt)


def _round_grad(fmt: Format, p: torch.Tensor) -> None:
    if p.grad is not None:
        with torch.no_grad():
            p.grad.copy_(quantize(p.grad, fmt))
