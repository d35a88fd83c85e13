"""Watching a model's numbers: per module, the range of every tensor against every format.

    with mp.watch(model) as watch:
        loss_fn(model(x), y).backward()
    stats = watch.stats()                     # {(module name, kind): TensorStats}, one host sync here
    stats["fc", "activation_grad"].share(mp.F16)  # {'overflow': 0.0, 'subnormal': 0.05, 'underflow': 0.2}

Kinds of tensors (`KINDS`): ``activation`` (a module's floating outputs), ``weight`` (its own
parameters, as they are when it runs), ``weight_grad`` (its parameters' gradients, after each
accumulation) and ``activation_grad`` (the gradients of its outputs, in backward).

For each: a histogram of log2|x| (one bin per binary exponent, FP32's whole range, subnormals
included), exact zeros and non-finite values counted apart, the largest |x|, and per format the number
of values that would overflow (round beyond its largest value: to inf, or saturate), land on a
subnormal, or underflow (round to zero) when rounded to nearest. Everything is accumulated on the
tensors' device with no host sync per tensor; the numbers reach the host once, in `Watch.stats`.

On a model prepared with an FP8 policy, the watch also counts every FP8 cast of its FP8 layers (their
`Fp8Layer.observer`, put back on exit): per (layer, role) the amax, the scales, and the values saturated
and flushed to zero (`Watch.fp8_stats`, `Watch.fp8_saturated`; see `fp8_casts`), read in the same
transfer as `stats`.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from ..execution.hooks import map_floats
from ..formats import FORMATS, Format
from ..state import prepared_state
from .fp8_casts import Fp8Observers, Fp8Stats

__all__ = ["watch", "Watch", "TensorStats", "KINDS", "EXPONENTS"]

KINDS = ("activation", "weight", "weight_grad", "activation_grad")
#: The binary exponents a float32 value can have: floor(log2|x|) from -149 (smallest subnormal) to 127.
EXPONENTS = np.arange(-149, 128)
_EXP0 = 149  # bin index of exponent 0 is _EXP0


def _f32_above(value: float) -> float:
    """The smallest float32 >= value (inf above float32's range): x >= value <=> x >= this, for float32 x."""
    if value > float(np.finfo(np.float32).max):
        return math.inf
    f = np.float32(value)
    return float(f) if float(f) >= value else float(np.nextafter(f, np.float32(np.inf)))


def _f32_below_strict(value: float) -> float:
    """The largest float32 < value (value itself a float32 or inf): x >= value <=> x > this."""
    if value == math.inf:
        return float(np.finfo(np.float32).max)
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _f32_below(value: float) -> float:
    """The largest float32 <= value: x <= value <=> x <= this, for float32 x."""
    f = np.float32(value)
    return float(f) if float(f) <= value else float(np.nextafter(f, np.float32(-np.inf)))


@dataclass(frozen=True)
class _Thresholds:
    """Where rounding to nearest (ties to even) onto `fmt` overflows, goes subnormal, or flushes to zero,
    as float32 comparisons on |x| (exact for float32 values)."""

    overflow_from: float  # |x| >= this rounds beyond fmt.max (midpoint between max and the next power)
    subnormal_above: float  # |x| > this rounds to a non-zero value (half the smallest subnormal: ties to 0)
    normal_from: float  # |x| >= this rounds to a normal (min_normal - half a subnormal step: ties up)

    @classmethod
    def of(cls, fmt: Format) -> _Thresholds:
        half_ulp_at_max = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits - 1)
        half_sub = fmt.min_subnormal / 2
        return cls(_f32_above(fmt.max + half_ulp_at_max), _f32_below(half_sub),
                   _f32_above(fmt.min_normal - half_sub))


@dataclass
class TensorStats:
    """What was seen of one kind of tensor in one module (or a merge of several); host numbers.

    Attributes:
        count: values seen (over every call and step watched).
        zeros: exact zeros; nonfinite: inf or NaN values.
        amax: the largest finite |x| (0.0 if none).
        histogram: counts of finite non-zero values per binary exponent, aligned with `EXPONENTS`
            (``histogram[i]`` counts values with ``2**EXPONENTS[i] <= |x| < 2**(EXPONENTS[i] + 1)``).
        formats: format name -> {"overflow": n, "subnormal": n, "underflow": n} (counts, finite values).
    """

    count: int
    zeros: int
    nonfinite: int
    amax: float
    histogram: np.ndarray
    formats: dict[str, dict[str, int]] = field(default_factory=dict)

    def share(self, fmt: Format | str) -> dict[str, float]:
        """The share of all values seen that would overflow, be subnormal, or underflow in `fmt`.

        Example:
            >>> import torch, mixprec as mp
            >>> with mp.watch(torch.nn.Identity()) as w:
            ...     _ = w.model(torch.tensor([1e5, 1.0, 1e-6, 1e-9]))
            >>> w.stats()["", "activation"].share("fp16")
            {'overflow': 0.25, 'subnormal': 0.25, 'underflow': 0.25}
        """
        name = Format.parse(fmt).name
        if name not in self.formats:
            raise KeyError(f"format {name} was not watched; watched: {', '.join(self.formats)}")
        return {k: (v / self.count if self.count else 0.0) for k, v in self.formats[name].items()}

    @property
    def nonzero(self) -> int:
        """Finite non-zero values (the histogram's total)."""
        return int(self.histogram.sum())

    def merge(self, other: TensorStats) -> TensorStats:
        """These statistics and `other`'s together (same formats)."""
        return TensorStats(
            self.count + other.count, self.zeros + other.zeros, self.nonfinite + other.nonfinite,
            max(self.amax, other.amax), self.histogram + other.histogram,
            {name: {k: v + other.formats[name][k] for k, v in counts.items()} for name, counts in self.formats.items()})


def _bincount(index: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each integer in 0..bins-1. torch.bincount on CPU (fast); on other devices histc with
    its range given, which needs no host sync (bincount reads the maximum back)."""
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=bins)
    return torch.histc(index.float(), bins=bins, min=0, max=bins).long()


class _Accumulator:
    """Device-side running statistics of one (module, kind): one int64 vector and one amax scalar.

    The vector holds the log2 histogram, then exact zeros and non-finite values (two more bins of the
    same scatter-add), then counts of |x| between consecutive format thresholds (one `bucketize`): every
    per-format count is a difference of those, taken on the host in `to_stats`. About ten passes over a
    tensor whatever the number of formats, and no host sync (no boolean indexing)."""

    def __init__(self, formats: list[Format], device: torch.device) -> None:
        self.formats, self.count = formats, 0
        # Every condition as "|x| > b": overflow |x| >= o <=> |x| > below(o); normal |x| >= n <=> |x| > below(n).
        self.edges = [(_f32_below_strict(t.overflow_from), t.subnormal_above, _f32_below_strict(t.normal_from))
                      for t in (_Thresholds.of(f) for f in formats)]
        self.boundaries = sorted({0.0, *(b for edge in self.edges for b in edge)})
        self.bins = len(EXPONENTS) + 2  # + zeros, non-finite
        self.counts = torch.zeros(self.bins + len(self.boundaries) + 1, dtype=torch.int64, device=device)
        self.amax = torch.zeros((), dtype=torch.float32, device=device)
        self._boundaries = torch.tensor(self.boundaries, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, cache: dict[int, tuple]) -> None:
        """Add `x`'s statistics. `cache` (id -> (weak reference, version, counts, amax)) lets a tensor seen
        by several modules (a child's output is its parent's) be measured once per version of it."""
        entry = cache.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:
            counts, amax = self._measure(x)
            if len(cache) > 4096:  # forget tensors that are gone
                for key in [k for k, e in cache.items() if e[0]() is None]:
                    del cache[key]
            entry = (weakref.ref(x), x._version, counts, amax)
            cache[id(x)] = entry
        self.count += x.numel()
        counts, amax = entry[2], entry[3]
        if counts is not None:
            self.counts += counts.to(self.counts.device)
            torch.maximum(self.amax, amax.to(self.amax.device), out=self.amax)

    @torch.no_grad()
    def _measure(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not x.numel():
            return None, None
        a = x.detach().float().reshape(-1).abs()
        finite = torch.isfinite(a)
        a = torch.where(finite, a, torch.zeros_like(a))
        exponent = torch.frexp(a).exponent.long() - 1 + _EXP0  # floor(log2|x|), as a bin index
        special = torch.where(finite, len(EXPONENTS), len(EXPONENTS) + 1)  # the zeros bin, the non-finite bin
        hist = _bincount(torch.where(a > 0, exponent, special), self.bins)
        bucket = torch.bucketize(a, self._boundaries.to(a.device))  # i: boundaries[i-1] < |x| <= boundaries[i]
        return torch.cat([hist, _bincount(bucket, len(self.boundaries) + 1)]), a.max()

    def to_stats(self, counts: np.ndarray, amax: float) -> TensorStats:
        hist = counts[:len(EXPONENTS)]
        zeros, nonfinite = int(counts[len(EXPONENTS)]), int(counts[len(EXPONENTS) + 1])
        buckets = counts[self.bins:]
        above = {b: int(buckets[i + 1:].sum()) for i, b in enumerate(self.boundaries)}  # finite |x| > b
        formats = {}
        for f, (overflow, subnormal, normal) in zip(self.formats, self.edges, strict=True):
            formats[f.name] = {"overflow": above[overflow], "subnormal": above[subnormal] - above[normal],
                               "underflow": above[0.0] - above[subnormal]}
        return TensorStats(self.count, zeros, nonfinite, amax, hist.copy(), formats)


class Watch:
    """Hooks that collect `TensorStats` on a model; `remove()` (or leaving the ``with`` block) takes
    them off. Built by `watch`. The model's results are bitwise those of an unwatched run: the hooks
    only read tensors."""

    def __init__(self, model: torch.nn.Module, formats: list[Format], kinds: tuple[str, ...],
                 modules: str | None, fp8: bool = True) -> None:
        self.model, self.formats, self.kinds = model, formats, kinds
        self._accumulators: dict[tuple[str, str], _Accumulator] = {}
        self._measured: dict[int, tuple] = {}  # see _Accumulator.add
        self._handles: list[RemovableHandle] = []
        self._removed = False  # gradient hooks on past forwards' outputs check it (they die with the tensors)
        self._added = 0  # tensors added: with the FP8 casts counted, what tells `_read` its last read is current
        self._last_read: tuple[tuple[int, int], dict, dict] | None = None
        named = [(n, m) for n, m in model.named_modules() if modules is None or fnmatch.fnmatchcase(n, modules)]
        if not named:
            raise ValueError(f"no module of this {type(model).__name__} matches modules={modules!r}; "
                             f"names look like {[n for n, _ in model.named_modules()][:4]}")
        state = prepared_state(model) if fp8 else None
        layers = [layer for name, layer in (state.fp8_layers.items() if state is not None else ())
                  if modules is None or fnmatch.fnmatchcase(name, modules)]
        self._fp8 = Fp8Observers(layers) if layers else None
        for name, module in named:
            if "activation" in kinds or "activation_grad" in kinds:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            if "weight" in kinds:
                self._handles.append(module.register_forward_pre_hook(self._weight_hook(name)))
            if "weight_grad" in kinds:
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _add(self, name: str, kind: str, x: torch.Tensor) -> None:
        if self._removed:
            return
        key = (name, kind)
        self._added += 1
        if key not in self._accumulators:
            self._accumulators[key] = _Accumulator(self.formats, x.device)
        self._accumulators[key].add(x, self._measured)

    def _forward_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            def visit(y: torch.Tensor) -> torch.Tensor:
                if "activation" in self.kinds:
                    self._add(name, "activation", y)
                if "activation_grad" in self.kinds and y.requires_grad:
                    y.register_hook(lambda g: self._add(name, "activation_grad", g))
                return y

            map_floats(output, visit)

        return hook

    def _weight_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            for p in module._parameters.values():
                if p is not None and p.is_floating_point():
                    self._add(name, "weight", p)

        return hook

    def _grad_hook(self, name: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._add(name, "weight_grad", p.grad)

        return hook

    def stats(self) -> dict[tuple[str, str], TensorStats]:
        """Everything seen so far, by (module name, kind). Syncs: yes, once (all counts in one transfer).

        Example:
            >>> import torch, mixprec as mp
            >>> model = torch.nn.Linear(2, 1)
            >>> with mp.watch(model) as w:
            ...     model(torch.ones(1, 2)).sum().backward()
            >>> sorted(kind for _, kind in w.stats())
            ['activation', 'activation_grad', 'weight', 'weight_grad']
        """
        return dict(self._read()[0])

    def fp8_stats(self) -> dict[tuple[str, str], Fp8Stats]:
        """A prepared FP8 model's FP8 casts so far, by (layer name, role ``input``/``weight``/``grad``): amax,
        scales, values saturated and flushed (`Fp8Stats`); empty without FP8 layers. Syncs: yes, once, in the
        same transfer as `stats` (none when `stats` was read since the last cast)."""
        return dict(self._read()[1])

    def fp8_saturated(self) -> list[Fp8Stats]:
        """The FP8 casts that saturated (finite values clamped to the format's max), the largest share first:
        each names its layer and role (``str(s)``: ``"2 (input, e4m3, delayed): 12 of 768 ... saturated"``).
        Syncs: as `fp8_stats`."""
        return sorted((s for s in self._read()[1].values() if s.saturated), key=lambda s: -s.share()["saturated"])

    def _read(self) -> tuple[dict[tuple[str, str], TensorStats], dict[tuple[str, str], Fp8Stats]]:
        """Both kinds of statistics, brought to the host together; the last read again if nothing was added."""
        token = (self._added, self._fp8.seen if self._fp8 is not None else 0)
        if self._last_read is not None and self._last_read[0] == token:
            return self._last_read[1], self._last_read[2]
        fp8 = self._fp8.stats() if self._fp8 is not None else {}
        found: dict[tuple[str, str], TensorStats] = {}
        if self._accumulators:
            keys = list(self._accumulators)
            accs = [self._accumulators[k] for k in keys]
            counts = torch.stack([a.counts.cpu() for a in accs]).numpy()  # one transfer per device in practice
            amaxes = torch.stack([a.amax.cpu() for a in accs]).tolist()
            found = {k: a.to_stats(c, m) for k, a, c, m in zip(keys, accs, counts, amaxes, strict=True)}
        self._last_read = (token, found, fp8)
        return found, fp8

    def totals(self) -> dict[str, TensorStats]:
        """Per kind, the statistics of every watched module together. Syncs: yes, once."""
        merged: dict[str, TensorStats] = {}
        for (_, kind), s in self.stats().items():
            merged[kind] = merged[kind].merge(s) if kind in merged else s
        return merged

    def reset(self) -> None:
        """Forget what was seen (the hooks stay)."""
        self._accumulators.clear()
        self._measured.clear()
        self._last_read = None
        if self._fp8 is not None:
            self._fp8.reset()

    def remove(self) -> None:
        """Take every hook off the model (gradient hooks on outputs of past forwards go quiet)."""
        self._removed = True
        self._measured.clear()
        if self._fp8 is not None:
            self._fp8.remove()  # the FP8 layers' observers are theirs again
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def watch(model: torch.nn.Module, formats: Iterable[Format | str] | None = None,
          kinds: Iterable[str] = KINDS, modules: str | None = None, fp8: bool = True) -> Watch:
    """Collect, per module, the range of its activations, weights and gradients against `formats`.

    Args:
        model: any module (prepared or not; under mp.autocast the 16-bit tensors are seen as they are).
        formats: the formats to measure overflow, subnormal and underflow shares for; default every
            named format (`mp.FORMATS`). Custom `mp.Format`s work too.
        kinds: a subset of `KINDS`.
        modules: a glob on qualified module names (``"h.*.attn"``); default every module, the root
            included (name ``""``).
        fp8: on a model prepared with an FP8 policy, count its FP8 layers' casts too (those matching
            `modules`): `Watch.fp8_stats`.

    Returns a `Watch`: use it as a context manager, or call `Watch.remove`. Syncs: no (until `stats`).

    Example:
        >>> import torch, mixprec as mp
        >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU())
        >>> with mp.watch(model, formats=["fp16"]) as w:
        ...     _ = model(torch.tensor([-1e5, 1e5, 3.0]))
        >>> s = w.stats()["1", "activation"]
        >>> s.amax, s.zeros, s.formats["fp16"]["overflow"]
        (100000.0, 1, 1)
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown or kinds}; valid: {', '.join(KINDS)}")
    chosen = list(FORMATS.values()) if formats is None else [Format.parse(f) for f in formats]
    return Watch(model, list(dict.fromkeys(chosen)), kinds, modules, fp8)
