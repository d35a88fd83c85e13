"""One gradient in two precisions: the 16-bit one on the model, where PyTorch keeps it, and its FP32
refinement on the master weight, which the optimizer steps on.

A parameter with an FP32 master gets a `GradSlot` (`mixprec.MasterWeights` makes them): hooks add every
incoming gradient into ``master.grad`` in FP32 (micro-batches sum in FP32) and write its rounding into
``param.grad``; the FP32 value counts only where it still rounds to ``param.grad``, so whatever changes
``param.grad`` (zero_grad, clipping, a reduction) wins. The DDP hook in `mixprec.distributed` reads and
writes the same slots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .emulate import quantize
from .formats import Format

__all__ = ["GradSlot", "stamp", "rounding_hook"]


class GradSlot:
    """One parameter with an FP32 master: how its 16-bit gradient and the FP32 one stay one gradient.

    ``param.grad`` (16-bit, or FP32 storage on ``fmt``'s grid when emulated) is the gradient everyone
    sees; ``master.grad`` (FP32) is the same gradient with more bits, valid where it rounds to it.
    ``reduced`` is set when mixprec's DDP communication hook produced ``master.grad`` (so it is equal
    on every rank); ``settled`` once the step took ``master.grad`` (which it then unscales in place).

    Checking the FP32 values against the 16-bit ones costs a few passes over them, so it is skipped
    while a tensor is untouched since mixprec last wrote it: same object, same storage, same version
    counter (which every in-place write through torch bumps: zero_, mul_, copy_, indexing, DDP's copy).
    """

    __slots__ = ("param", "master", "fmt", "emulated", "reduced", "settled", "_grad_seen", "_param_seen")

    def __init__(self, param: torch.Tensor, master: torch.Tensor, fmt: Format, emulated: bool) -> None:
        self.param, self.master, self.fmt, self.emulated = param, master, fmt, emulated
        self.reduced = self.settled = False
        self._grad_seen: tuple[int, int, int] | None = None
        self._param_seen = stamp(param)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """`x` rounded onto the parameter's format, in the parameter's dtype."""
        return quantize(x, self.fmt) if self.emulated else x.to(self.param.dtype)

    def refine(self, fp32: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """`fp32` where it rounds to `visible` (and is in range), else `visible` (rounded) in FP32."""
        rounded = self.round(fp32)
        keep = (rounded == visible) & torch.isfinite(rounded)
        return torch.where(keep, fp32, visible if not self.emulated else quantize(visible, self.fmt))

    def settle_(self, trust_fp32: bool = True) -> None:
        """Make ``master.grad`` the FP32 form of ``param.grad`` (None when it is None)."""
        visible = self.param.grad
        if visible is None:
            self.master.grad = None
        elif self.master.grad is None or not trust_fp32:
            self.master.grad = (quantize(visible, self.fmt) if self.emulated else visible).to(
                torch.float32, copy=True)
        elif stamp(visible) != self._grad_seen:  # written since the hook rounded the FP32 sum into it
            self.master.grad = self.refine(self.master.grad, visible)

    def sync_master_(self, trust_fp32: bool = True) -> None:
        """Follow weights written into the parameter since mixprec last rounded the master into it."""
        if stamp(self.param) != self._param_seen:
            self.master.copy_(self.refine(self.master, self.param) if trust_fp32 else self.param)
            self.wrote_param()

    def wrote_param(self) -> None:
        """Record that the parameter now holds the rounded master."""
        self._param_seen = stamp(self.param)

    def release_(self) -> None:
        """Drop this step's FP32 gradient: the step consumed it (applied or skipped)."""
        self.master.grad = None
        self.reduced = self.settled = False

    def accumulate_hook(self, grad: torch.Tensor) -> None:
        # Runs before autograd adds `grad` into param.grad: add it into the FP32 gradient instead,
        # starting from whatever param.grad holds now (None after zero_grad, zeros, a clipped value...).
        with torch.no_grad():
            incoming = quantize(grad, self.fmt) if self.emulated else grad  # a 16-bit param's grad is 16-bit
            self.settle_()
            self.settled = False
            if self.master.grad is None:
                self.master.grad = incoming.to(torch.float32, copy=True)
            else:
                self.master.grad.add_(incoming)

    def write_back_hook(self, param: torch.Tensor) -> None:
        # After autograd's (16-bit) accumulation: param.grad becomes the rounding of the FP32 sum.
        if param.grad is not None and self.master.grad is not None:
            with torch.no_grad():
                param.grad.copy_(self.round(self.master.grad))
            self._grad_seen = stamp(param.grad)


def stamp(t: torch.Tensor) -> tuple[int, int, int]:
    """What changes when a tensor is replaced, re-pointed or written in place (see GradSlot)."""
    return id(t), t.data_ptr(), t._version


def rounding_hook(fmt: Format) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook rounding ``p.grad`` onto `fmt`, as a 16-bit parameter's .grad is rounded
    (emulated parameters without an FP32 master). A partial, not a closure: the model still pickles."""
    return functools.partial(_round_grad, fmt)


def _round_grad(fmt: Format, p: torch.Tensor) -> None:
    if p.grad is not None:
        with torch.no_grad():
            p.grad.copy_(quantize(p.grad, fmt))
