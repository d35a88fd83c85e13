"""FP8 casts seen: per Linear layer and operand, what a scaled cast onto E4M3/E5M2 saturated or flushed.

Two sources feed the same device-side counts (`Fp8Counts`):

* a *prepared* FP8 model's own casts: `Fp8Observers` sets every `Fp8Layer.observer` (what `mp.watch`
  does while it is open, read with `Watch.fp8_stats`), so each cast of an input, weight or output
  gradient is counted as the layer made it, with its recipe's scales (delayed ones included);
* an *unprepared* model's Linear layers, cast as if they were FP8 under several granularities at once
  (`Fp8Survey`, which `mp.doctor` runs during its FP32 steps).

Per (layer, role): the values cast; the finite non-zero ones; the non-finite ones; the *saturated* ones
(finite values whose scaled magnitude ``|t * s|`` rounds beyond the format's max, ``|t * s| >= max + half
an ulp``: 464 for E4M3, 61440 for E5M2; the cast clamped them to max, where rounding alone would not
have); the *flushed* ones (finite non-zero values whose FP8 bits are zero); the largest finite ``|t|``
and the smallest and largest scale used. Shares are of the finite non-zero values (an exact zero is
exact in FP8 too), as everywhere in the doctor. A tensor is cast once per matmul it enters, as
`fp8_linear` does: the input along K (forward) and along the tokens (weight gradient), the weight along
K and along N, the output gradient along N and along the tokens; every cast counts.

Everything is added on the tensors' device with no host sync per cast; `read` brings the numbers of
many layers to the host in one transfer per device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..formats import E4M3, E5M2
from ..fp8.linear import ROLES, Fp8Layer
from ..fp8.recipe import Fp8Recipe
from ..fp8.scales import FP8_DTYPES, Scaled, expand

__all__ = ["Fp8Stats", "Fp8Counts", "Fp8Observers", "Fp8Survey", "read", "SURVEYED", "SATURATES_FROM"]

#: The granularities the doctor tries, coarsest (fewest scales; tensorwise and rowwise run natively) first.
#: Delayed scaling's scales are tensorwise ones taken from past amaxes: the survey reports it as tensorwise.
SURVEYED = ("tensorwise", "rowwise", "blockwise", "mx")
#: Per float8 dtype: the scaled magnitude from which rounding would leave the format (max + half an ulp).
SATURATES_FROM = {FP8_DTYPES[f.name]: f.max + 2.0 ** (f.max_exponent - f.mantissa_bits - 1) for f in (E4M3, E5M2)}
_FORMAT_NAMES = {dtype: name for name, dtype in FP8_DTYPES.items()}
Key = tuple[str, str, str]  # (layer, role, granularity)


def _pct(share: float) -> str:
    return "0" if share == 0 else f"{100 * share:.3g}%"


@dataclass(frozen=True)
class Fp8Stats:
    """What the FP8 casts of one operand (`role`: input, weight, grad) of one Linear layer did; host numbers.

    Attributes:
        layer, role: the layer's qualified name and the operand.
        format: ``"e4m3"`` or ``"e5m2"``; granularity: the scales' (``"delayed"`` for delayed scaling).
        casts: how many casts were counted; count: the values they cast.
        nonzero: finite non-zero values; nonfinite: inf or NaN values.
        saturated: finite values the cast clamped to the format's max (see module doc).
        flushed: finite non-zero values whose FP8 bits are zero.
        amax: the largest finite ``|t|``; scale_min, scale_max: the smallest and largest scale used.
    """

    layer: str
    role: str
    format: str
    granularity: str
    casts: int
    count: int
    nonzero: int
    nonfinite: int
    saturated: int
    flushed: int
    amax: float
    scale_min: float
    scale_max: float

    def share(self) -> dict[str, float]:
        """The shares of the finite non-zero values that saturated and that flushed to zero.

        Example:
            >>> Fp8Stats("fc", "input", "e4m3", "tensorwise", 1, 10, 8, 0, 0, 2, 3.0, 149.3, 149.3).share()
            {'saturated': 0.0, 'flushed': 0.25}
        """
        n = self.nonzero
        return {"saturated": self.saturated / n if n else 0.0, "flushed": self.flushed / n if n else 0.0}

    def __str__(self) -> str:
        s = self.share()
        return (f"{self.layer} ({self.role}, {self.format}, {self.granularity}): {self.saturated} of {self.nonzero} "
                f"non-zero values saturated ({_pct(s['saturated'])}), {self.flushed} flushed to zero "
                f"({_pct(s['flushed'])}); amax {self.amax:.4g}, scales {self.scale_min:.4g}..{self.scale_max:.4g}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": self.share()}


class Fp8Counts:
    """Device-side running counts of FP8 casts, one row per (layer, role, granularity) key.

    The rows live on the device of the first tensor counted: an int64 (keys, 4) tensor of non-zero,
    non-finite, saturated and flushed counts, and a float32 (keys, 3) one of the running maxima of amax,
    -scale and scale. `add` launches a few element-wise kernels and reductions: no host sync."""

    def __init__(self, keys: Iterable[Key]) -> None:
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.casts, self.values = [0] * len(self.keys), [0] * len(self.keys)
        self.formats = [""] * len(self.keys)
        self.counts: torch.Tensor | None = None
        self.ranges: torch.Tensor | None = None
        self.seen = 0  # casts added (a host number: a reader's cache can tell new counts from old)

    def reset(self) -> None:
        self.casts, self.values = [0] * len(self.keys), [0] * len(self.keys)
        self.counts = self.ranges = None
        self.seen += 1

    @torch.no_grad()
    def add(self, key: Key, t: torch.Tensor, cast: Scaled) -> None:
        """Count the cast of the 2-D `t` into `cast` under `key`. Syncs: no."""
        i = self.index[key]
        self.seen += 1
        self.casts[i] += 1
        self.values[i] += t.numel()
        self.formats[i] = _FORMAT_NAMES[cast.dtype]
        if not t.numel():
            return
        with torch._C.DisableTorchFunction():  # plain FP32 counting, which no emulation nor trace records
            self._add(i, t, cast)

    def _add(self, i: int, t: torch.Tensor, cast: Scaled) -> None:
        if self.counts is None or self.ranges is None:
            self.counts = torch.zeros(len(self.keys), 4, dtype=torch.int64, device=t.device)
            self.ranges = torch.full((len(self.keys), 3), -math.inf, device=t.device)
            self.ranges[:, 0] = 0.0
        a = t.detach().to(torch.float32).abs()
        finite = torch.isfinite(a)
        nonzero = finite & (a > 0)
        scale = cast.scale.detach().to(torch.float32)
        scaled = a * expand(scale, cast.block, (a.shape[0], a.shape[1]))  # |t * s|, as the cast computed it
        saturated = finite & (scaled >= SATURATES_FROM[cast.dtype])
        flushed = nonzero & (cast.values == 0)  # the FP8 value is +0 or -0
        counts = torch.stack([nonzero.sum(), (~finite).sum(), saturated.sum(), flushed.sum()])
        self.counts[i] += counts.to(self.counts.device)
        ranges = torch.stack([torch.where(finite, a, 0.0).amax(), -scale.amin(), scale.amax()])
        self.ranges[i] = torch.maximum(self.ranges[i], ranges.to(self.ranges.device))

    def _numbers(self) -> torch.Tensor:
        """Every row's 7 numbers as float64 (counts are exact up to 2^53)."""
        assert self.counts is not None and self.ranges is not None
        return torch.cat([self.counts.double(), self.ranges.double()], dim=1)

    def _stats(self, numbers: list[list[float]] | None) -> list[Fp8Stats]:
        found = []
        for i, (layer, role, granularity) in enumerate(self.keys):
            if not self.casts[i]:
                continue
            n = numbers[i] if numbers is not None else [0, 0, 0, 0, 0.0, -math.inf, -math.inf]
            found.append(Fp8Stats(layer, role, self.formats[i], granularity, self.casts[i], self.values[i],
                                  int(n[0]), int(n[1]), int(n[2]), int(n[3]), n[4], -n[5], n[6]))
        return found


def read(counts: Iterable[Fp8Counts]) -> list[Fp8Stats]:
    """The host numbers of every key cast at least once, in key order. Syncs: yes, one transfer per device.

    Example:
        >>> from mixprec.fp8.scales import scaled_cast
        >>> c = Fp8Counts([("fc", "input", "tensorwise")])
        >>> x = torch.tensor([[1e-6, 1.0, 448.0, 0.0]])
        >>> c.add(("fc", "input", "tensorwise"), x, scaled_cast(x, torch.float8_e4m3fn, "tensorwise", dim=1))
        >>> s, = read([c])
        >>> s.nonzero, s.flushed, s.saturated, s.amax, s.scale_min
        (3, 1, 0, 448.0, 1.0)
    """
    counts = list(counts)
    by_device: dict[torch.device, list[Fp8Counts]] = {}
    for c in counts:
        if c.counts is not None:
            by_device.setdefault(c.counts.device, []).append(c)
    numbers: dict[int, list[list[float]]] = {}
    for group in by_device.values():
        rows = torch.cat([c._numbers() for c in group]).cpu().tolist()
        for c in group:
            numbers[id(c)], rows = rows[:len(c.keys)], rows[len(c.keys):]
    return [s for c in counts for s in c._stats(numbers.get(id(c)))]


Observer = Callable[[str, str, torch.Tensor, Scaled], None]


class Fp8Observers:
    """Counting observers on FP8 layers (`Fp8Layer.observer`), chained to any observer already set there;
    `remove` puts those back. Keys: (layer name, role, the recipe's granularity).

    With ``replay=True`` (what `mp.trace_nonfinite` uses) `remove` also restores the layers' delayed-scaling
    state (histories, pending amaxes and their flag) as it was when they were put on: the amaxes a replay
    records are not pushed by the next `mp.step`."""

    def __init__(self, layers: Iterable[Fp8Layer], replay: bool = False) -> None:
        self.layers = list(layers)
        self.counts = [Fp8Counts((layer.name, role, layer.recipe.granularity) for role in ROLES)
                       for layer in self.layers]
        self._removed = False
        self._saved = [(layer.history.clone(), layer.pending.clone(), layer.recorded) for layer in self.layers
                       ] if replay else []
        self._installed: list[tuple[Observer, Observer | None]] = []
        for layer, counts in zip(self.layers, self.counts, strict=True):
            mine = self._observer(counts, layer.recipe.granularity, layer.observer)
            self._installed.append((mine, layer.observer))
            layer.observer = mine

    def _observer(self, counts: Fp8Counts, granularity: str, previous: Observer | None) -> Observer:
        def observe(name: str, role: str, t: torch.Tensor, scaled: Scaled) -> None:
            if not self._removed:
                counts.add((name, role, granularity), t, scaled)
            if previous is not None:
                previous(name, role, t, scaled)

        return observe

    @property
    def seen(self) -> int:
        return sum(c.seen for c in self.counts)

    def stats(self) -> dict[tuple[str, str], Fp8Stats]:
        """By (layer, role): what the casts did so far. Syncs: yes, once (a transfer per device)."""
        return {(s.layer, s.role): s for s in read(self.counts)}

    def saturated(self) -> list[str]:
        """``"layer (role)"`` of every operand whose cast saturated, in layer order. Syncs: yes, once."""
        return [f"{s.layer} ({s.role})" for s in self.stats().values() if s.saturated]

    def reset(self) -> None:
        for c in self.counts:
            c.reset()

    def remove(self) -> None:
        """Take the observers off (putting back those they chained to); restore replayed state."""
        if self._removed:
            return
        self._removed = True  # an observer some later one chained to goes quiet, and passes calls on
        for layer, (mine, previous) in zip(self.layers, self._installed, strict=True):
            if layer.observer is mine:
                layer.observer = previous
        for layer, (history, pending, recorded) in zip(self.layers, self._saved, strict=False):
            layer.history.copy_(history)
            layer.pending.copy_(pending)
            layer.recorded = recorded


class Fp8Survey:
    """What FP8 matmuls would do to the Linear layers of an unprepared model, under several granularities.

    On every forward of an ``nn.Linear`` (nn.Linear's own forward: the layers mixprec can make FP8), its
    input and weight, and in backward its output gradient, are cast exactly as an `Fp8Layer` of each
    granularity would cast them (the six casts of a step, see module doc; input and weight onto E4M3,
    the gradient onto `grad_format`) and counted, then dropped: nothing is kept between casts. Keys:
    (layer, role, granularity). `remove` (or leaving the ``with`` block) takes the hooks off.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
        >>> with Fp8Survey(model, ["tensorwise", "rowwise"]) as survey:
        ...     model(torch.randn(4, 16)).sum().backward()
        >>> s = survey.stats()
        >>> len(s), s["0", "grad", "rowwise"].format, s["1", "input", "tensorwise"].casts
        (12, 'e5m2', 2)
    """

    def __init__(self, model: torch.nn.Module, granularities: Iterable[str] = SURVEYED,
                 grad_format: str = "e5m2") -> None:
        self.granularities = tuple(granularities)
        self.counts: list[Fp8Counts] = []
        self._handles: list[RemovableHandle] = []
        self._removed = False
        for name, module in model.named_modules():
            if (not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward
                    or "forward" in vars(module)):  # another forward (a prepared FP8 layer's own, for one)
                continue
            counts = Fp8Counts((name, role, g) for role in ROLES for g in self.granularities)
            casters = [Fp8Layer(name, Fp8Recipe(g, grad_format=grad_format)) for g in self.granularities]
            for layer in casters:
                layer.observer = self._observer(counts, layer.recipe.granularity)
            self.counts.append(counts)
            self._handles.append(module.register_forward_hook(self._forward_hook(casters)))

    def _observer(self, counts: Fp8Counts, granularity: str) -> Observer:
        def observe(name: str, role: str, t: torch.Tensor, scaled: Scaled) -> None:
            counts.add((name, role, granularity), t, scaled)

        return observe

    def _forward_hook(self, casters: list[Fp8Layer]) -> Callable[..., None]:
        def hook(module: torch.nn.Linear, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args else None
            if self._removed or not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            flat, w = x.detach().reshape(-1, x.shape[-1]), module.weight.detach()
            for layer in casters:  # the forward's x @ W^T, and the backward's grad_W = g^T @ x, grad_x = g @ W
                layer.cast(flat, "input", 1)
                layer.cast(flat, "input", 0)
                layer.cast(w.t(), "weight", 0)
                layer.cast(w, "weight", 0)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(casters))

        return hook

    def _grad_hook(self, casters: list[Fp8Layer]) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._removed:
                return
            g = grad.detach().reshape(-1, grad.shape[-1])
            for layer in casters:
                layer.cast(g, "grad", 1)
                layer.cast(g.t(), "grad", 1)

        return hook

    def stats(self) -> dict[Key, Fp8Stats]:
        """By (layer, role, granularity): what the casts did. Syncs: yes, once (a transfer per device)."""
        return {(s.layer, s.role, s.granularity): s for s in read(self.counts)}

    def remove(self) -> None:
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Fp8Survey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
