"""What `mixprec bench` times side by side: torch's own baselines and mixprec policies, each a `Run`
that trains the recipe's model one phase at a time (forward, backward, step).

`parse_runs` reads a --policies string into the runs' specs (a baseline's name or a parsed policy),
checked before anything is built; `build` makes one run from the seed's initial weights. The torch
baselines (`BASELINES`) are written with torch's own API, as a torch user writes them; a mixprec policy
runs the README's loop (mp.prepare, mp.autocast, scaler.scale(loss).backward(), mp.step).
`mixprec.harness.benchmark` times them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

import mixprec as mp
from mixprec.harness.determinism import isolated_rng
from mixprec.harness.training import split_policies
from mixprec.recipes import Batch, Recipe

#: torch baselines: name -> what runs
BASELINES: dict[str, str] = {
    "fp32": "torch, FP32, TF32 off (strict FP32 matmuls and convolutions)",
    "fp32-tf32": "torch, FP32 with TF32 matmuls and convolutions (CUDA; on a CPU the same as fp32)",
    "amp-fp16": "torch.autocast(float16) + torch.amp.GradScaler, FP32 weights",
    "amp-bf16": "torch.autocast(bfloat16), FP32 weights, no loss scaling",
}


@contextlib.contextmanager
def tf32(enabled: bool | None, device: torch.device) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions on (True) or off (False) inside the block, restored after;
    None, or a device that is not CUDA: nothing changes (TF32 is a CUDA tensor-core mode)."""
    if enabled is None or device.type != "cuda":
        yield
        return
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; the old flags are deprecated
        cudnn: Any = torch.backends.cudnn  # torch sets conv and rnn on the module's class: no type checker sees them
        settings: list[Any] = [torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn]
        before = [s.fp32_precision for s in settings]
        try:
            for s in settings:
                s.fp32_precision = mode
            yield
        finally:
            for s, value in zip(settings, before, strict=True):
                s.fp32_precision = value
        return
    before_flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before_flags


def fused_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt as the same class with ``fused=True`` (built before any step: it has no state),
    the kind that skips an overflowing step on the device, so GradScaler and mp.step(sync=False) never sync."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters  # defaults may hold more (AdamW's decoupled_weight_decay)
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [{**g, "fused": True, "foreach": None} for g in optimizer.param_groups]
    if "fused" in accepted:
        fused = cls(groups, **{**settings, "fused": True, "foreach": None})
        if getattr(fused, "_step_supports_amp_scaling", False):
            return fused
    raise ValueError(f"--fused: the recipe's {cls.__name__} has no fused variant that skips a step on the "
                     f"device (torch's Adam, AdamW, SGD and Adagrad have one): leave --fused out, or give "
                     f"the recipe one of those")


@dataclass
class Run:
    """One way of training the recipe's model. Subclasses give forward, backward and step."""

    name: str
    kind: str  # "torch" or "mixprec"
    description: str
    execution: str
    recipe: Recipe
    device: torch.device
    note: str | None = None
    skipped_steps: int = 0
    held_bytes: int = 0  # CUDA: bytes this run holds between steps (model, optimizer state, masters)
    peak_bytes: int = 0  # CUDA: the most it held during a step, as if it ran alone
    times: dict[str, list[float]] = field(default_factory=lambda: {"forward": [], "backward": [], "step": []})
    last_loss: torch.Tensor | None = None
    # Set by each subclass's __init__ (not arguments of this one): what trains, and its optimizer.
    model: torch.nn.Module = field(init=False, repr=False, compare=False)
    optimizer: torch.optim.Optimizer = field(init=False, repr=False, compare=False)

    def settings(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def loss_scale(self) -> float | None:
        """The loss scale after the last step (None without one); read outside the timed region."""
        return None

    def after_step(self) -> None:
        """Called after each step, outside the timed region (a place for a host sync)."""

    def count_memory(self, batch: Batch) -> mp.MemoryReport:
        """Bytes by category (`mp.memory`) after one more forward + backward (so the gradients exist, and
        the optimizer state after the steps so far), with one forward's saved activations; untimed, and
        the gradients are dropped again without a step."""
        with self.settings():
            self.backward(self.forward(batch))
            report = mp.memory(self.model, self.optimizer, run=lambda: self.forward(batch))
        self.optimizer.zero_grad(set_to_none=True)
        return report


class TorchRun(Run):
    """A torch baseline, written as a torch user writes it: autocast, GradScaler, clip_grad_norm_, step."""

    def __init__(self, name: str, recipe: Recipe, device: torch.device, compile: bool, fused: bool = False) -> None:
        note = None
        if name == "fp32-tf32" and device.type != "cuda":
            note = f"TF32 is a CUDA tensor-core mode: on {device.type} this runs exactly as fp32"
        super().__init__(name, "torch", BASELINES[name], "native", recipe, device, note)
        self.dtype = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(name)
        self.tf32 = {"fp32": False, "fp32-tf32": True}.get(name)  # None: the settings as found
        model = recipe.make_model().to(device)
        self.optimizer = recipe.build_optimizer(model.parameters())
        if fused:
            self.optimizer = fused_optimizer(self.optimizer)
        self.params = list(model.parameters())
        self.model = _compiled(model) if compile else model
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self._scale = self.scaler.get_scale() if self.scaler is not None else 0.0  # its initial scale: no sync

    def settings(self) -> contextlib.AbstractContextManager:
        return tf32(self.tf32, self.device)

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.recipe.loss(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        clip = self.recipe.max_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.optimizer)  # skips the update if a gradient is inf/NaN: syncs unless fused
            self.scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None  # syncs: read outside the timing

    def after_step(self) -> None:
        """Count a skipped step as GradScaler shows one: its scale went down (read after the timed region)."""
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.skipped_steps += scale < self._scale
            self._scale = scale


class MixprecRun(Run):
    """A mixprec policy, trained with the README's loop."""

    def __init__(self, name: str, policy: mp.Policy, recipe: Recipe, device: torch.device, compile: bool,
                 fused: bool = False) -> None:
        execution = policy.resolve_execution(device)
        ran = execution if execution == "native" else f"emulated ({policy.emulation})"
        note = None
        if execution == "emulated":
            note = ("emulated: values rounded onto the format's grid, arithmetic in FP32; this times the "
                    "emulation, not 16-bit hardware")
        super().__init__(name, "mixprec", mp.PRESETS.get(name, str(policy)), ran, recipe, device, note)
        model = recipe.make_model().to(device)
        optimizer = recipe.build_optimizer(model.parameters())
        if fused:
            optimizer = fused_optimizer(optimizer)
        if compile:
            model = _compiled(model)
        self.model, prepared, self.scaler = mp.prepare(model, optimizer, policy)
        assert prepared is not None  # given an optimizer, mp.prepare returns one
        self.optimizer = prepared
        self.fused = fused
        self.info: mp.StepInfo | None = None  # the last step's, read in after_step (outside the timing)

    def forward(self, batch: Batch) -> torch.Tensor:
        with mp.autocast(self.model):
            return self.recipe.loss(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        # Syncs once; fused: never (the optimizer skips an overflow on the device, info holds device tensors).
        self.info = mp.step(self.optimizer, self.scaler, max_grad_norm=self.recipe.max_grad_norm, sync=not self.fused)
        self.optimizer.zero_grad()

    def after_step(self) -> None:
        """Count a skipped step (fused: reading info.applied syncs, so it is read here, after the timed region)."""
        assert self.info is not None  # step() ran before
        self.skipped_steps += not bool(self.info.applied)

    def loss_scale(self) -> float | None:
        return self.scaler.loss_scale


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``: its OptimizedModule wrapper, a module (torch's hints say only callable)."""
    return cast(torch.nn.Module, torch.compile(model))


Spec = tuple[str, "str | mp.Policy"]  # (the name given, a baseline name or a parsed policy)


def parse_runs(text: str, device: str) -> list[Spec]:
    """(name as given, baseline name or parsed policy) for each of ``text``'s comma-separated parts,
    checked (duplicates, the device) before anything is built."""
    runs: list[Spec] = []
    for part in split_policies(text):
        if part in BASELINES:
            runs.append((part, part))
            continue
        try:
            policy = mp.Policy.parse(part)
        except ValueError as error:
            raise ValueError(f"{error}; or a torch baseline: {', '.join(BASELINES)}") from None
        policy.make_scaler()
        policy.resolve_execution(device)  # raises if the device cannot run it as asked
        runs.append((part, policy))
    names = [str(spec) for _, spec in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"listed twice in --policies: {', '.join(duplicates)}")
    if torch.device(device).type == "cuda" and "amp-bf16" in names and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp-bf16: {torch.cuda.get_device_name(device)} has no bfloat16; leave it out")
    return runs


def build(spec: Spec, recipe: Recipe, device: torch.device, compile: bool, seed: int, fused: bool = False) -> Run:
    """A run from the same initial weights as every other (the seed), with the bytes it holds on CUDA;
    ``fused``: with the recipe's optimizer rebuilt with fused=True (`fused_optimizer`)."""
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    name, what = spec
    with isolated_rng(seed):
        run = (TorchRun(name, recipe, device, compile, fused) if isinstance(what, str)
               else MixprecRun(name, what, recipe, device, compile, fused))
    if cuda:
        run.held_bytes = torch.cuda.memory_allocated(device) - before
    return run


def check_fused(recipe: Recipe) -> None:
    """Raise `fused_optimizer`'s ValueError now if the recipe's optimizer has no fused variant (on a
    one-element stand-in parameter: nothing is built)."""
    fused_optimizer(recipe.build_optimizer([torch.nn.Parameter(torch.zeros(1))]))
