"""Fault injection: inf/NaN in gradients, a NaN loss, an inf activation, at chosen steps or at a random rate.

A fault plan is a small string that parses and prints back (``str(FaultPlan.parse(s))`` parses to the
same plan)::

    grad:inf@3,7;loss:nan@rate=0.01;act[0]:inf@10-20;seed=1

Clauses are separated by ``;``. Each fault is ``KIND[TARGET]:VALUE@WHEN``:

* KIND: ``grad`` (one element of a parameter's gradient, after backward), ``loss`` (the loss, so that
  its gradients are inf/NaN too, as with a NaN made inside the loss computation) or ``act`` (one
  element of a module's output in the forward pass, the value added to it so that the gradient flows
  through it as through an op that made it; a later op may still absorb it, e.g. tanh(inf) = 1, and
  then the step is rightly applied).
* TARGET (optional, in brackets): the parameter (``grad``) or module (``act``) name as in
  ``model.named_parameters()`` / ``named_modules()``; without one, a random parameter with a gradient,
  or a random leaf module, each time.
* VALUE: ``inf``, ``-inf`` or ``nan``.
* WHEN: step numbers and ranges, counted from 1 as the training logs count them (``3,7,10-20``), or
  ``rate=P``: each step independently with probability P in (0, 1].

``seed=N`` (default 0) makes the random choices: whether a ``rate`` fault fires at a step, the target
and the element are a pure function of (seed, clause, step), so a run (or a resumed one) injects the
same faults whatever happened before, and the training's own random numbers are not touched.

Use it from the API, in the order of a training step (`mixprec.harness.training.train` does the same with
``faults=``, and ``mixprec train --inject-faults SPEC``):

    injector = FaultInjector("grad:inf@rate=0.1;seed=3", model)
    with injector.forward(step):          # act faults: a hook on the chosen module, for this step only
        loss = loss_fn(model(x), y)
    loss = injector.loss(step, loss)      # loss faults
    scaler.scale(loss).backward()
    injector.grads(step)                  # grad faults, into param.grad
    info = mp.step(optimizer, scaler)     # skips the step: info.applied is False

`FaultInjector.injections` lists every fault injected, with its step and target.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Fault", "FaultPlan", "FaultInjector", "Injection"]

KINDS = ("grad", "loss", "act")
VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
EXAMPLE = "grad:inf@3,7;loss:nan@rate=0.01;act[0]:inf@10-20;seed=1"
_FAULT = re.compile(r"(?P<kind>\w+)(?:\[(?P<target>[^\]]*)\])?:(?P<value>[^@]*)@(?P<when>.*)")


def _bad(text: str, why: str) -> ValueError:
    return ValueError(
        f"bad fault spec {text!r}: {why}. A spec is clauses joined by ';', each KIND[TARGET]:VALUE@WHEN or "
        f"seed=N: KIND grad, loss or act; VALUE inf, -inf or nan; WHEN steps from 1 (3,7,10-20) or rate=P "
        f"with 0 < P <= 1; e.g. {EXAMPLE!r}")


@dataclass(frozen=True)
class Fault:
    """One clause of a `FaultPlan`: what to inject (kind, value, target) and when (steps or rate).

    ``steps`` holds inclusive ranges ``(first, last)``, sorted and merged.

    Example:
        >>> str(Fault("grad", "nan", steps=((3, 3), (10, 12)), target="fc.weight"))
        'grad[fc.weight]:nan@3,10-12'
    """

    kind: str
    value: str
    steps: tuple[tuple[int, int], ...] = ()
    rate: float | None = None
    target: str | None = None

    def __str__(self) -> str:
        target = f"[{self.target}]" if self.target is not None else ""
        when = f"rate={self.rate!r}" if self.rate is not None else ",".join(
            str(a) if a == b else f"{a}-{b}" for a, b in self.steps)
        return f"{self.kind}{target}:{self.value}@{when}"

    def fires(self, step: int, rng: random.Random) -> bool:
        """Whether this fault is injected at ``step`` (``rng``: the clause's generator for that step)."""
        if self.rate is not None:
            return rng.random() < self.rate
        return any(a <= step <= b for a, b in self.steps)


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject when: `parse` a spec string, `str` prints it back (see the module docstring).

    Example:
        >>> plan = FaultPlan.parse("grad:inf@7,3;loss:nan@rate=0.01;seed=1")
        >>> str(plan)
        'grad:inf@3,7;loss:nan@rate=0.01;seed=1'
        >>> FaultPlan.parse(str(plan)) == plan
        True
        >>> [f.kind for f in plan.at(3)]
        ['grad']
    """

    faults: tuple[Fault, ...]
    seed: int = 0

    @classmethod
    def parse(cls, text: str | FaultPlan) -> FaultPlan:
        """Parse a spec like ``"grad:inf@3,7;loss:nan@rate=0.01;seed=1"``; ValueError saying what is valid."""
        if isinstance(text, FaultPlan):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a fault spec is a string such as {EXAMPLE!r}, got {type(text).__name__}")
        faults, seed = [], None
        for clause in (c.strip() for c in text.split(";")):
            if not clause:
                raise _bad(text, "an empty clause")
            if clause.startswith("seed="):
                if seed is not None:
                    raise _bad(text, "seed is given twice")
                value = clause.removeprefix("seed=")
                if not value.isdigit():
                    raise _bad(text, f"seed must be an integer >= 0, got {value!r}")
                seed = int(value)
            else:
                faults.append(_parse_fault(text, clause))
        if not faults:
            raise _bad(text, "no fault in it")
        return cls(tuple(faults), seed or 0)

    def __str__(self) -> str:
        return ";".join([*map(str, self.faults), f"seed={self.seed}"])

    def at(self, step: int, kind: str | None = None) -> list[Fault]:
        """The faults injected at ``step`` (of ``kind``, if given). Pure: the same answer every time."""
        return [f for _, f, _ in self._firing(step, kind)]

    def _firing(self, step: int, kind: str | None) -> Iterator[tuple[int, Fault, random.Random]]:
        for index, fault in enumerate(self.faults):
            if kind is None or fault.kind == kind:
                # One generator per (seed, clause, step): decisions do not depend on anything else.
                rng = random.Random(f"{self.seed}/{index}/{step}")
                if fault.fires(step, rng):
                    yield index, fault, rng


def _parse_fault(text: str, clause: str) -> Fault:
    match = _FAULT.fullmatch(clause)
    if not match:
        raise _bad(text, f"cannot read {clause!r}")
    kind, target, value, when = match.group("kind", "target", "value", "when")
    if kind not in KINDS:
        raise _bad(text, f"unknown kind {kind!r} in {clause!r}")
    if value not in VALUES:
        raise _bad(text, f"unknown value {value!r} in {clause!r}")
    if target is not None and (kind == "loss" or not target):
        raise _bad(text, f"{clause!r}: " + ("a loss fault has no target" if kind == "loss" else "empty target"))
    if when.startswith("rate="):
        try:
            rate = float(when.removeprefix("rate="))
        except ValueError:
            rate = math.nan
        if not 0 < rate <= 1:
            raise _bad(text, f"rate must be a probability in (0, 1], got {when!r} in {clause!r}")
        return Fault(kind, value, rate=rate, target=target)
    ranges = []
    for item in when.split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        first, last = (int(found.group(1)), int(found.group(2) or found.group(1))) if found else (0, 0)
        if not found or first < 1 or last < first:
            raise _bad(text, f"{item.strip()!r} in {clause!r} is not a step (from 1) or a range FIRST-LAST")
        ranges.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return Fault(kind, value, steps=tuple(merged), target=target)


@dataclass(frozen=True)
class Injection:
    """One fault injected: at which step, what, and where (a parameter or module name, or ``"loss"``)."""

    step: int
    kind: str
    value: str
    target: str


class FaultInjector:
    """Inject a `FaultPlan`'s faults into one model's training steps (see the module docstring for the loop).

    Args:
        plan: a `FaultPlan` or its spec string.
        model: the model being trained (the one whose parameters and modules the targets name; the module
            inside a DistributedDataParallel or torch.compile wrapper).

    Raises:
        ValueError: the spec does not parse, or a target names no parameter / module of ``model``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> injector = FaultInjector("grad[bias]:nan@2", model)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> injector.grads(1), injector.grads(2)
        ([], [Injection(step=2, kind='grad', value='nan', target='bias')])
        >>> model.bias.grad
        tensor([nan])
    """

    def __init__(self, plan: FaultPlan | str, model: torch.nn.Module) -> None:
        self.plan = FaultPlan.parse(plan)
        self.injections: list[Injection] = []  # every fault injected so far, in order
        self._params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        # Modules without children; the model itself when it is one (a bare nn.Linear, say: named "").
        self._leaves = {name: m for name, m in modules.items() if not any(m.children())}
        for fault in self.plan.faults:
            known = self._params if fault.kind == "grad" else modules
            if fault.target is not None and fault.target not in known:
                what = "parameter" if fault.kind == "grad" else "module"
                names = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
                raise ValueError(f"fault {str(fault)!r}: the model has no {what} named {fault.target!r}; "
                                 f"its {what}s: {names}")
        self._modules = modules

    @contextlib.contextmanager
    def forward(self, step: int) -> Iterator[None]:
        """Inside the block, the ``act`` faults of ``step`` replace one element of their module's output
        (its first floating tensor, on the module's first call) by the fault's value. Syncs: no."""
        handles = []
        for _, fault, rng in self.plan._firing(step, "act"):
            name = fault.target if fault.target is not None else rng.choice(sorted(self._leaves))
            handles.append(self._modules[name].register_forward_hook(self._activation_hook(step, fault, name, rng)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _activation_hook(self, step: int, fault: Fault, name: str, rng: random.Random) -> Callable:
        done: list[bool] = []

        def hook(module: torch.nn.Module, args: object, output: object) -> object:
            if done:
                return None
            outputs = list(output) if isinstance(output, (tuple, list)) else [output]
            for i, out in enumerate(outputs):
                if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                    # Added, not written over: the gradient still flows through the element, so the inf/NaN
                    # reaches the gradients as it does when an op makes it (a masked write would not).
                    fault_values = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
                    fault_values[rng.randrange(out.numel())] = VALUES[fault.value]
                    outputs[i] = out + fault_values.view(out.shape)
                    done.append(True)
                    self.injections.append(Injection(step, "act", fault.value, name))
                    return outputs[0] if not isinstance(output, (tuple, list)) else type(output)(outputs)
            return None

        return hook

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, times inf or NaN if a ``loss`` fault fires at ``step`` (so its gradients are non-finite
        too, as when the NaN comes from inside the loss computation). Syncs: no."""
        for _, fault, _ in self.plan._firing(step, "loss"):
            loss = loss * VALUES[fault.value]
            self.injections.append(Injection(step, "loss", fault.value, "loss"))
        return loss

    @torch.no_grad()
    def grads(self, step: int) -> list[Injection]:
        """Write the ``grad`` faults of ``step`` into one element of their parameter's ``.grad`` (a parameter
        without a gradient is left alone: nothing is injected). Returns what was injected. Syncs: no."""
        done = []
        for _, fault, rng in self.plan._firing(step, "grad"):
            with_grad = sorted(name for name, p in self._params.items() if p.grad is not None)
            name = fault.target if fault.target is not None else (rng.choice(with_grad) if with_grad else None)
            grad = None if name is None else self._params[name].grad
            if name is None or grad is None or not grad.numel():
                continue
            flat_index = torch.tensor(rng.randrange(grad.numel()))
            grad[tuple(int(i) for i in torch.unravel_index(flat_index, grad.shape))] = VALUES[fault.value]
            done.append(Injection(step, "grad", fault.value, name))
        self.injections += done
        return done
